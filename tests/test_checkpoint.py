"""Checkpoints: exact resume on 2 ranks for ZeRO 0-3, atomic saves, keep-K, preemption, bad paths.

Every multi-rank test runs its loops inside one ``run_ranks`` launch (one process group,
started first so the loops reuse it) to keep the number of launches small.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess

import numpy as np
import pytest
import torch
from helpers import MLPRegressor, RegressionData, make_model
from torch import nn
from torch.utils.data import DataLoader

from zeroloop import LogSettings, TrainerLoop
from zeroloop.checkpoint import (LATEST, MANIFEST, CheckpointError, Checkpointer, CheckpointSettings, find_checkpoint,
                                 list_checkpoints, rank_file, read_manifest)
from zeroloop.data import GlobalBatchSampler
from zeroloop.errors import ConfigError
from zeroloop.resume import plan_resume
from zeroloop.state import TrainState
from zeroloop.testing import RankFailure, full_parameters, run_ranks, single_process, tiny_config

# 64 samples / (2 ranks x micro-batch 2) = 16 micro-batches per epoch = 8 optimizer steps at
# gradient accumulation 2: stopping at step 5 is mid-epoch 0, step 10 is in epoch 1.
STEPS = 10
STOP_AT = 5
# After a resume at step 5, DeepSpeed's CPU Adam would recompute beta2**6 with pow(), which
# differs in the last bit from the running product of an uninterrupted run (at 3 it does not).
SIGNAL_AT = 5


def resume_config(stage: int) -> dict:
    config = tiny_config(stage=stage, micro=2, ga=2, lr=1e-2)
    config["scheduler"] = {"type": "WarmupDecayLR",
                           "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2, "warmup_num_steps": 3,
                                      "total_num_steps": "auto"}}
    return config


class DropoutRegressor(MLPRegressor):
    """Draws from the torch RNG every micro-step: resuming must restore each rank's RNG state."""

    def __init__(self):
        super().__init__()
        self.net.insert(2, nn.Dropout(0.25))


def make_dropout_model(seed: int = 0) -> DropoutRegressor:
    torch.manual_seed(seed)
    return DropoutRegressor()


class RecordingLoop(TrainerLoop):
    """Asks to stop after ``stop_at`` steps (as a preemption would, or with a real SIGTERM
    when ``signal_at`` is given) and keeps the final full weights."""

    def __init__(self, *args, stop_at=None, signal_at=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_at, self.signal_at = stop_at, signal_at
        self.final_weights = None

    def on_step_end(self, step, metrics):
        if step == self.stop_at:
            self.checkpointer.request_stop()
        if step == self.signal_at and self.rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_end(self, summary):
        self.final_weights = full_parameters(self.engine)  # collective under ZeRO-3: every rank


def train_once(stage, output_dir, checkpoint=None, loader=False, **loop_kwargs):
    # loader: the user's own shuffled DataLoader (with a worker), which zeroloop re-shards.
    data = DataLoader(RegressionData(64), batch_size=2, shuffle=True, num_workers=1) if loader else RegressionData(64)
    loop = RecordingLoop(make_dropout_model(0), resume_config(stage), train_data=data,
                         output_dir=output_dir, max_steps=STEPS, seed=3,
                         log=LogSettings(every=1, progress_bar=False), checkpoint=checkpoint, **loop_kwargs)
    summary = loop.train()
    return {"losses": [record["loss"] for record in summary.history], "steps": summary.steps,
            # numpy, not tensors: torch would pass tensors to the parent through shared memory
            "weights": {name: value.numpy() for name, value in loop.final_weights.items()}}


def exact_resume_ranks(rank, stage, root):
    import deepspeed

    deepspeed.init_distributed()  # one process group for every loop
    settings = CheckpointSettings(every=2, keep=2)
    results = {}
    for kind, loader in (("dataset", False), ("loader", True)):
        run_dir = os.path.join(root, kind, "run")
        straight = train_once(stage, os.path.join(root, kind, "straight"), loader=loader)
        stopped = train_once(stage, run_dir, settings, loader=loader, stop_at=STOP_AT)
        tags_after_stop = checkpoint_entries(os.path.join(run_dir, "checkpoints"))
        resumed = train_once(stage, run_dir, settings, loader=loader)
        results[kind] = {"straight": straight, "stopped": stopped, "resumed": resumed,
                         "tags_after_stop": tags_after_stop}
    return results


def checkpoint_entries(folder):
    """Tag folders and ``latest`` (DeepSpeed also copies its zero_to_*.py scripts there)."""
    return sorted(name for name in os.listdir(folder) if not name.endswith(".py"))


def assert_exact_resume(result):
    straight, stopped, resumed = result["straight"], result["stopped"], result["resumed"]
    assert stopped["steps"] == STOP_AT and resumed["steps"] == STEPS
    assert len(resumed["losses"]) == STEPS - STOP_AT  # max_steps counts the steps before the resume
    assert stopped["losses"] + resumed["losses"] == straight["losses"]
    assert straight["weights"].keys() == resumed["weights"].keys()
    for name, value in straight["weights"].items():
        assert np.array_equal(value, resumed["weights"][name]), name


@pytest.mark.multirank
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_exact_resume_mid_epoch(stage, tmp_path):
    results = run_ranks(exact_resume_ranks, 2, stage, str(tmp_path))
    for result in results:
        assert_exact_resume(result["dataset"])
        assert_exact_resume(result["loader"])
    # keep=2: saved at 2, 4 and (stop) 5; then, resumed from 5, at 6, 8, 10. The newest two
    # are kept, and the one resumed from is never deleted.
    assert results[0]["dataset"]["tags_after_stop"] == ["global_step4", "global_step5", LATEST]
    folder = tmp_path / "dataset" / "run" / "checkpoints"
    assert checkpoint_entries(folder) == ["global_step10", "global_step5", "global_step8", LATEST]
    assert (folder / LATEST).read_text() == "global_step10"
    manifest = read_manifest(str(folder / "global_step5"))
    # 5 steps x accumulation 2 x micro-batch 2 x 2 ranks = 40 samples of epoch 0's 64.
    state = manifest["train_state"]
    assert (manifest["global_step"], state["step"], state["epoch"], state["epoch_samples"]) == (STOP_AT, STOP_AT, 0, 40)
    assert (state["micro_steps"], state["samples"]) == (2 * STOP_AT, 40)
    assert (manifest["world_size"], manifest["zero_stage"]) == (2, stage)
    assert manifest["lr_scheduler"] == {"last_batch_iteration": STOP_AT - 1}


def sigterm_ranks(rank, root):
    import deepspeed

    deepspeed.init_distributed()
    straight = train_once(1, os.path.join(root, "straight"))
    run_dir = os.path.join(root, "run")
    signalled = train_once(1, run_dir, CheckpointSettings(every=None), signal_at=SIGNAL_AT)
    handler_after = signal.getsignal(signal.SIGTERM)
    return {"straight": straight, "stopped": signalled, "handler_restored": handler_after == signal.SIG_DFL}


def restarted_ranks(rank, root):
    import deepspeed

    deepspeed.init_distributed()
    resumed = train_once(1, os.path.join(root, "run"), CheckpointSettings(every=None))
    # Resumed at max_steps: nothing left to train, and no new checkpoint.
    finished = train_once(1, os.path.join(root, "run"), CheckpointSettings(every=None))
    return resumed, finished


@pytest.mark.multirank
def test_sigterm_saves_and_stops_cleanly_then_resumes_exactly(tmp_path):
    # SIGTERM on rank 1 after step 5: both ranks agree at that step boundary, save and
    # return normally (run_ranks only returns results of ranks that exited 0). The resume
    # runs in new processes, as after a real restart: no state of the first run survives
    # in memory (DeepSpeed's CPU Adam keeps some in C++).
    results = run_ranks(sigterm_ranks, 2, str(tmp_path))
    restarted = run_ranks(restarted_ranks, 2, str(tmp_path))
    for result, (resumed, finished) in zip(results, restarted):
        assert result["handler_restored"]
        assert finished["steps"] == STEPS and finished["losses"] == []
        for name, value in resumed["weights"].items():
            assert np.array_equal(value, finished["weights"][name]), name
        straight, stopped = result["straight"], result["stopped"]
        assert stopped["steps"] == SIGNAL_AT and resumed["steps"] == STEPS
        assert stopped["losses"] + resumed["losses"] == straight["losses"]
        for name, value in straight["weights"].items():
            assert np.array_equal(value, resumed["weights"][name]), name
    assert [step for step, _ in list_checkpoints(str(tmp_path / "run" / "checkpoints"))] == [SIGNAL_AT, STEPS]


def killed_save_ranks(rank, root):
    """Saves at steps 2 and 4; rank 1 dies inside the step-4 save, after DeepSpeed wrote
    its files (so the temporary folder looks nearly complete)."""
    loop = TrainerLoop(make_model(0), resume_config(2), train_data=RegressionData(64), output_dir=root,
                       max_steps=STEPS, seed=3, log=LogSettings(progress_bar=False),
                       checkpoint=CheckpointSettings(every=2, keep=5))
    loop.setup()
    if rank == 1:
        save_checkpoint = loop.engine.save_checkpoint

        def save_then_die(save_dir, tag, **kwargs):
            save_checkpoint(save_dir, tag, **kwargs)
            if tag.startswith("global_step4"):
                os._exit(3)

        loop.engine.save_checkpoint = save_then_die
    loop.train()


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A checkpoint folder where the step-4 save was killed on rank 1 (one 2-rank launch)."""
    root = tmp_path_factory.mktemp("interrupted")
    with pytest.raises(RankFailure):
        run_ranks(killed_save_ranks, 2, str(root), timeout=120)
    return root / "checkpoints"


@pytest.mark.multirank
def test_killed_save_leaves_latest_at_previous_checkpoint(interrupted_run):
    folder = interrupted_run
    assert (folder / LATEST).read_text() == "global_step2"
    assert not (folder / "global_step4").exists()
    assert (folder / "global_step4.tmp").is_dir()  # what the crash left; never loadable
    assert not (folder / "global_step4.tmp" / MANIFEST).exists()
    assert find_checkpoint("latest", str(folder)) == str(folder / "global_step2")
    manifest = read_manifest(str(folder / "global_step2"))
    assert set(manifest["rank_files"]) == {rank_file(0), rank_file(1)}
    assert all(name in manifest["files"] for name in manifest["rank_files"])
    with pytest.raises(CheckpointError, match=f"{MANIFEST} is missing"):
        find_checkpoint(str(folder / "global_step4.tmp"), str(folder))


@pytest.mark.multirank
def test_deepspeed_zero_to_fp32_reads_the_layout(interrupted_run):
    # DeepSpeed's own tool follows `latest` into the tag folder zeroloop published.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(interrupted_run))
    expected = make_model(0).state_dict()
    assert {name: value.shape for name, value in state.items()} == \
        {name: value.shape for name, value in expected.items()}


@pytest.fixture
def damaged(interrupted_run, tmp_path):
    """A copy of the interrupted run's checkpoint folder, free to break."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(interrupted_run / "global_step2", folder / "global_step2")
    shutil.copytree(interrupted_run / "global_step2", folder / "global_step1")
    manifest = json.loads((folder / "global_step1" / MANIFEST).read_text())
    manifest["global_step"] = 1
    (folder / "global_step1" / MANIFEST).write_text(json.dumps(manifest))
    (folder / LATEST).write_text("global_step2")
    return folder


@pytest.mark.multirank
def test_truncated_file_is_named_and_latest_falls_back(damaged, caplog):
    model_file = damaged / "global_step2" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt is 100 bytes"):
        find_checkpoint(str(damaged / "global_step2"), str(damaged))
    with caplog.at_level("WARNING", logger="zeroloop"):
        assert find_checkpoint("latest", str(damaged)) == str(damaged / "global_step1")
    assert "newest complete checkpoint" in caplog.text


@pytest.mark.multirank
def test_missing_rank_file_is_named(damaged):
    os.remove(damaged / "global_step2" / rank_file(1))
    with pytest.raises(CheckpointError, match=rf"{rank_file(1)} is missing"):
        find_checkpoint(str(damaged / "global_step2"), str(damaged))


@pytest.mark.multirank
def test_latest_naming_a_missing_tag(damaged):
    (damaged / LATEST).write_text("global_step9")
    assert find_checkpoint("latest", str(damaged)) == str(damaged / "global_step2")
    shutil.rmtree(damaged / "global_step1")
    shutil.rmtree(damaged / "global_step2")
    with pytest.raises(CheckpointError, match="names 'global_step9'.*does not exist"):
        find_checkpoint("latest", str(damaged))


@pytest.mark.multirank
def test_world_size_and_stage_changes_load_through_a_universal_checkpoint(damaged):
    manifest = read_manifest(str(damaged / "global_step2"))
    config = manifest["ds_config"]
    assert not plan_resume(manifest, config, 2).universal
    for world_size, stage in ((4, 2), (2, 3), (1, 0)):
        changed = {**config, "zero_optimization": {"stage": stage}}
        plan = plan_resume(manifest, changed, world_size)
        assert plan.universal and plan.changes[0].startswith(f"layout 2 ranks, ZeRO-2, fp32 -> {world_size} rank")


def test_resume_path_that_does_not_exist(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder.*resume=None"):
        find_checkpoint(str(tmp_path / "nope"), str(tmp_path))


def test_resume_latest_in_an_empty_folder_starts_fresh(tmp_path):
    assert find_checkpoint("latest", str(tmp_path / "checkpoints")) is None
    assert find_checkpoint(None, str(tmp_path)) is None


def test_settings_are_checked(tmp_path):
    assert CheckpointSettings().problems() == []
    bad = CheckpointSettings(keep=0, every=0, final_weights="all")  # constructing never raises
    expected = ["checkpoint.final_weights: must be True, False or \"trainable\", got 'all'",
                "checkpoint.every: must be a positive number of optimizer steps or None, got 0",
                "checkpoint.keep: must be an integer >= 1 (checkpoints to keep), got 0"]
    assert bad.problems() == expected
    with pytest.raises(ConfigError) as info:
        Checkpointer(bad, str(tmp_path), engine=None, state=TrainState(), facts=None)
    assert info.value.problems == expected


def test_sampler_starts_at_a_global_position():
    sampler = GlobalBatchSampler(20, micro_batch_size=2, rank=1, world_size=2, seed=5, shuffle=True, drop_tail=True)
    full = list(sampler)
    assert len(full) == len(sampler) == 5
    sampler.set_position(0, 8)  # two global micro-batches of 4 consumed: this rank skips two of its own
    assert list(sampler) == full[2:]
    with pytest.raises(ValueError, match="multiple of 4"):
        sampler.set_position(0, 6)


def test_first_signal_asks_to_stop_and_second_aborts(tmp_path):
    checkpointer = Checkpointer(CheckpointSettings(), str(tmp_path), engine=None, state=TrainState(), facts=None)
    # Python's own SIGINT handler before ours, whatever started the tests (a shell's
    # background job, for one, starts with SIGINT ignored).
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    checkpointer.install_signal_handlers()
    try:
        signal.raise_signal(signal.SIGINT)
        assert checkpointer._stop_requested
        with pytest.raises(KeyboardInterrupt):  # the handler before ours
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        checkpointer.remove_signal_handlers()
        signal.signal(signal.SIGINT, outer)


def test_resuming_an_older_checkpoint_keeps_each_step_once_in_metrics(tmp_path):
    def run(resume):
        loop = TrainerLoop(make_model(0), resume_config(0), train_data=RegressionData(64), output_dir=tmp_path,
                           max_steps=4, seed=3, log=LogSettings(every=1, progress_bar=False),
                           checkpoint=CheckpointSettings(every=2, resume=resume, final_weights=False))
        return loop.train()

    with single_process():
        first = run(None)
    with single_process():
        again = run(str(tmp_path / "checkpoints" / "global_step2"))  # steps 3 and 4 are trained again
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    assert [record["loss"] for record in records] == [h["loss"] for h in first.history]
    assert [h["step"] for h in again.history] == [3, 4]


def test_a_repeated_sigterm_is_ignored_and_sigint_after_it_only_asks_to_stop(tmp_path):
    # SLURM signals every process and the launcher forwards its own copy: a rank gets
    # several SIGTERMs for one stop, and none of them may kill it half-way through its save.
    checkpointer = Checkpointer(CheckpointSettings(), str(tmp_path), engine=None, state=TrainState(), facts=None)
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in test_first_signal_asks_to_stop_and_second_aborts
    checkpointer.install_signal_handlers()
    try:
        for signum in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
            signal.raise_signal(signum)
        assert checkpointer._stop_requested
        assert signal.getsignal(signal.SIGTERM) == checkpointer._on_signal  # still ours
        with pytest.raises(KeyboardInterrupt):  # the second SIGINT
            signal.raise_signal(signal.SIGINT)
    finally:
        checkpointer.remove_signal_handlers()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --- disk trouble: a save that cannot be written -----------------------------------------------


class LimitFileSize:
    """RLIMIT_FSIZE on every rank: writes past 2 KiB fail with EFBIG, even for root."""

    def start(self, rank, folder):
        import resource

        self.saved = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, self.saved[1]))

    def stop(self, rank, folder):
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, self.saved)


class FillTheDisk:
    """Rank 0 fills the small file system until it reports ENOSPC."""

    def start(self, rank, folder):
        if rank == 0:
            fd = os.open(os.path.join(folder, "..", "filler"), os.O_WRONLY | os.O_CREAT)
            try:
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * 4096)
            finally:
                os.close(fd)

    def stop(self, rank, folder):
        if rank == 0:
            os.remove(os.path.join(folder, "..", "filler"))


class MakeReadOnly:
    """Rank 0 bind-mounts the checkpoint folder read-only over itself (root is refused too)."""

    def start(self, rank, folder):
        if rank == 0:
            subprocess.run(["mount", "--bind", folder, folder], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", folder], check=True)

    def stop(self, rank, folder):
        if rank == 0:
            subprocess.run(["umount", folder], check=True)


class TroubleLoop(TrainerLoop):
    """Saves at steps 2 and 4; the trouble starts after step 3, so the step-4 save fails."""

    def __init__(self, *args, trouble, **kwargs):
        super().__init__(*args, **kwargs)
        self.trouble = trouble

    def on_step_end(self, step, metrics):
        if step == 3:
            self.trouble.start(self.rank, self.checkpointer.folder)


def train_into_trouble(rank, output_dir, trouble):
    import deepspeed.comm as dist

    loop = TroubleLoop(make_model(0), resume_config(2), train_data=RegressionData(64), output_dir=output_dir,
                       max_steps=6, seed=3, log=LogSettings(every=100, progress_bar=False),
                       checkpoint=CheckpointSettings(every=2), trouble=trouble)
    try:
        loop.train()
        error = None
    except CheckpointError as e:
        error = str(e)
    finally:
        trouble.stop(rank, loop.checkpointer.folder)
    dist.barrier()
    folder = loop.checkpointer.folder
    return {"error": error, "entries": checkpoint_entries(folder),
            "complete": [step for step, _ in list_checkpoints(folder)],
            "latest": (open(os.path.join(folder, LATEST)).read())}


def disk_trouble_ranks(rank, root, small_fs):
    import deepspeed

    deepspeed.init_distributed()  # one process group for every loop
    results = {"file size limit": train_into_trouble(rank, os.path.join(root, "fsize"), LimitFileSize())}
    if small_fs is not None:
        results["disk full"] = train_into_trouble(rank, os.path.join(small_fs, "full"), FillTheDisk())
        results["read-only"] = train_into_trouble(rank, os.path.join(root, "ro"), MakeReadOnly())
    return results


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs (root with CAP_SYS_ADMIN only; None elsewhere, where only the
    RLIMIT_FSIZE case runs: mounts are also how the read-only case is made)."""
    mount_point = tmp_path / "small_fs"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield str(mount_point)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


# What each trouble looks like in the error (torch's zip writer hides errno: the hints tell).
TROUBLE_WORDS = {"file size limit": "RLIMIT_FSIZE", "disk full": "bytes free", "read-only": "read-only"}


@pytest.mark.multirank
def test_a_save_that_cannot_be_written_fails_cleanly(tmp_path, small_fs):
    results = run_ranks(disk_trouble_ranks, 2, str(tmp_path / "runs"), small_fs, timeout=600)
    if small_fs is None:
        print("no tmpfs could be mounted (not root): only the RLIMIT_FSIZE case ran")
    for trouble, result in results[0].items():
        error = result["error"]
        # The same error on both ranks, naming the save, the folder that failed and why.
        assert error is not None and results[1][trouble]["error"] == error, trouble
        assert "checkpoint global_step4 could not be written" in error, error
        assert "global_step4.tmp" in error and TROUBLE_WORDS[trouble] in error, error
        assert "`latest` still names global_step2, which is complete" in error, error
        # The previous checkpoint is complete and still named; no half tag is visible.
        assert result["latest"] == "global_step2" and result["complete"] == [2], trouble
        assert result["entries"] == ["global_step2", LATEST], (trouble, result["entries"])


# --- node-local storage: each machine keeps its ranks' files in its own folder -----------------


def node_local_loop(rank, root, max_steps):
    config = resume_config(2)
    config["checkpoint"] = {"use_node_local_storage": True}
    return TrainerLoop(make_model(0), config, train_data=RegressionData(64), output_dir=os.path.join(root, f"node{rank}"),
                       max_steps=max_steps, seed=3, log=LogSettings(progress_bar=False),
                       checkpoint=CheckpointSettings(every=2, keep=5))


def node_local_ranks(rank, root):
    """Two "machines" of one rank (LOCAL_RANK 0 on both), each with its own folder."""
    import deepspeed
    import deepspeed.comm as dist

    import zeroloop.saving as saving_module  # the save protocol publishes through it

    deepspeed.init_distributed()
    folder = os.path.join(root, f"node{rank}", "checkpoints")
    node_local_loop(rank, root, 4).train()  # saves at 2 and 4 on both machines
    entries_after_save = checkpoint_entries(folder)
    # A crash between the machines' publishing: machine 1 never got step 4.
    if rank == 1:
        shutil.rmtree(os.path.join(folder, "global_step4"))
        with open(os.path.join(folder, LATEST), "w") as f:
            f.write("global_step2")
    dist.barrier()
    behind = node_local_loop(rank, root, 6)
    behind.setup()
    resumed_at = behind.global_step
    behind.train()  # saves at 4 and 6 again, on both

    # Publishing fails on machine 1 only: machine 0 takes its published step 8 back.
    loop = node_local_loop(rank, root, 8)
    if rank == 1:
        replace_latest = saving_module.replace_latest

        def failing_replace_latest(folder, tag):
            if tag == "global_step8":
                raise OSError(28, "No space left on device", os.path.join(folder, LATEST))
            replace_latest(folder, tag)

        saving_module.replace_latest = failing_replace_latest
    try:
        loop.train()
        publish_error = None
    except CheckpointError as e:
        publish_error = str(e)
    entries_after_failed_publish = checkpoint_entries(folder)

    # Machine 1 lost its disk: nothing to resume from in common.
    dist.barrier()
    if rank == 1:
        shutil.rmtree(folder)
    dist.barrier()
    try:
        node_local_loop(rank, root, 10).setup()
        lost_error = None
    except CheckpointError as e:
        lost_error = str(e)
    return {"entries_after_save": entries_after_save, "resumed_at": resumed_at, "publish_error": publish_error,
            "entries_after_failed_publish": entries_after_failed_publish, "lost_error": lost_error,
            "manifest": read_manifest(os.path.join(root, "node0", "checkpoints", "global_step2")) if rank == 0 else None}


@pytest.mark.multirank
def test_node_local_storage(tmp_path):
    results = run_ranks(node_local_ranks, 2, str(tmp_path), env={"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    for rank, result in enumerate(results):
        # Each machine's folder holds its own checkpoints, named by its own latest.
        assert result["entries_after_save"] == ["global_step2", "global_step4", LATEST]
        # One machine a save behind: both resume from the newest step complete on both.
        assert result["resumed_at"] == 2
        # Publishing failed on machine 1: the save fails on both, and machine 0 took step 8 back.
        assert "rank 1:" in result["publish_error"] and "No space left on device" in result["publish_error"]
        assert result["entries_after_failed_publish"] == ["global_step2", "global_step4", "global_step6", LATEST]
        assert "no checkpoint is complete on every machine" in result["lost_error"]
    assert (tmp_path / "node0" / "checkpoints" / LATEST).read_text() == "global_step6"
    manifest = results[0]["manifest"]
    assert manifest["node_local"] and manifest["rank_files"] == [rank_file(0)]
    assert not (tmp_path / "node0" / "checkpoints" / "global_step2" / rank_file(1)).exists()
