"""A quiet, fast first run: no C++ op build training does not use, a line before one it does,
and each message once."""

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from helpers import RegressionData, make_model

from zeroloop import TrainerLoop, quiet
from zeroloop.ops import announce_builds, clear_stale_build_locks, optimizer_builder
from zeroloop.testing import run_ranks, single_process, tiny_config


def adam(**params):
    return {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, **params}}}


def test_the_optimizer_op_deepspeed_will_load():
    assert optimizer_builder(adam()) == "FusedAdamBuilder"
    assert optimizer_builder(adam(torch_adam=True)) is None
    offloaded = dict(adam(), zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}})
    assert optimizer_builder(offloaded) == "CPUAdamBuilder"
    assert optimizer_builder({"optimizer": {"type": "SGD", "params": {"lr": 0.1}}}) is None
    assert optimizer_builder({}) is None


def test_a_build_is_announced_on_rank_0_only(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty cache: a build is due
    caplog.set_level(logging.INFO, logger="zeroloop")
    message = announce_builds(adam(), rank=0)
    assert "fused_adam" in message and str(tmp_path) in message and '"torch_adam": true' in message
    assert message in caplog.text
    assert announce_builds(adam(), rank=1) is None
    assert announce_builds(adam(torch_adam=True), rank=0) is None


def test_the_process_group_starts_without_the_shm_comm_op(tmp_path):
    import deepspeed.comm as dist
    from deepspeed.comm import comm

    with single_process():
        TrainerLoop(make_model(), tiny_config(), train_data=RegressionData(), output_dir=tmp_path,
                    max_steps=1).setup()
        assert dist.is_initialized() and comm.cdb.shm_comm_op is None


HOLD_OPEN = "import os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); print(fd, flush=True); time.sleep(60)"


def builder_holding(lock: Path) -> subprocess.Popen:
    """A process that takes the build lock the way torch's FileBaton does and keeps it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD_OPEN, str(lock)], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()  # the lock exists and is open
    return proc


def test_a_build_lock_is_removed_only_once_its_holder_is_gone(tmp_path, caplog):
    lock = tmp_path / "fused_adam" / "lock"
    builder = builder_holding(lock)
    try:
        assert clear_stale_build_locks(str(tmp_path), recheck_s=0.1) == []  # a build in progress
        assert lock.exists()
    finally:
        builder.kill()
        builder.wait()
    assert clear_stale_build_locks(str(tmp_path), recheck_s=0.1) == [str(lock)]
    assert not lock.exists() and "killed while building" in caplog.text


def wait_for_op_lock(rank, lock):
    from torch.utils.file_baton import FileBaton

    FileBaton(lock).wait()  # what a rank loading a C++ op does while another builds it
    return rank


def test_ranks_do_not_wait_forever_on_a_lock_left_by_a_killed_build(tmp_path):
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    killed = builder_holding(lock)
    killed.kill()
    killed.wait()
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    assert run_ranks(wait_for_op_lock, 1, str(lock), env=env, timeout=60) == [0]


def record(name, level, message):
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def test_info_from_rank_0_only_warnings_from_every_rank(monkeypatch):
    info, warning = record("zeroloop", logging.INFO, "checkpoint saved"), record("zeroloop", logging.WARNING, "x")
    monkeypatch.setenv("RANK", "1")
    assert not quiet.RankZeroInfo().filter(info) and quiet.RankZeroInfo().filter(warning)
    monkeypatch.setenv("RANK", "0")
    assert quiet.RankZeroInfo().filter(info)


def test_deepspeed_noise_is_dropped(monkeypatch):
    noise = quiet.DeepSpeedNoise()
    scheduler = record("DeepSpeed", logging.WARNING, "Attempting to get learning rate from scheduler before it has "
                                                     "started")
    accelerator = record("DeepSpeed", logging.WARNING, "Setting accelerator to CPU. If you have GPU ...")
    other = record("DeepSpeed", logging.WARNING, "total_num_steps 2 is less than warmup_num_steps 30")
    monkeypatch.setenv("RANK", "0")
    assert not noise.filter(scheduler) and noise.filter(accelerator) and noise.filter(other)
    monkeypatch.setenv("RANK", "1")
    assert not noise.filter(accelerator) and noise.filter(other)
    assert any(isinstance(f, quiet.DeepSpeedNoise) for f in logging.getLogger("DeepSpeed").filters)


def test_deprecated_collective_warnings_are_ignored_and_only_those():
    quiet.install()  # idempotent; re-applied because pytest resets the warning filters per test
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet.install()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Use ...", FutureWarning)
        warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated. Use ...", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


ZERO3_SCRIPT = """
import sys
from helpers import RegressionData, make_model
from zeroloop import LogSettings, TrainerLoop
from zeroloop.testing import tiny_config
TrainerLoop(make_model(), tiny_config(stage=3), train_data=RegressionData(), output_dir=sys.argv[1], max_steps=6,
            log=LogSettings(every=1, progress_bar=False)).train()
print("done")
"""


@pytest.mark.launcher
def test_zero3_under_plain_python_prints_no_deprecation_warning(tmp_path):
    script = tmp_path / "zero3.py"
    script.write_text(ZERO3_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                            "MASTER_ADDR")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parent.parent),
                                         env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0 and "done" in result.stdout, result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr[-3000:]
