"""zeroloop.consolidate (zeroloop.consolidation) and the final-weights export (zeroloop.export):
DeepSpeed checkpoints to safetensors, checked against DeepSpeed's own zero_to_fp32 and against the
trained engine's outputs.

One 2-rank run (the ``checkpoints`` fixture) trains and saves every checkpoint the tests read.
"""

import contextlib
import io
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from zeroloop import consolidate
from zeroloop.cli import main as cli_main
from zeroloop import safetensors_io, zero_layout
from zeroloop.errors import CheckpointError, CheckpointNotFoundError
from zeroloop.safetensors_io import INDEX_NAME, WEIGHTS_NAME, load_state_dict, parse_shard_size
from zeroloop.gpt import GPT
from zeroloop.testing import run_ranks, tiny_config


# Odd widths on purpose: ZeRO-3 then pads parameters and ZeRO-1/2 pad the groups.
GPT_ARGS = dict(n_layer=1, n_head=3, n_embd=15, block_size=8)
# name: (ZeRO stage, training precision, frozen wpe, also write final weights from the engine)
RUNS = {
    "s0_fp32": (0, "fp32", False, False),
    "s0_bf16": (0, "bf16", False, True),
    "s1_fp32": (1, "fp32", False, False),
    "s2_fp32": (2, "fp32", False, False),
    "s2_bf16": (2, "bf16", False, True),
    "s3_fp32": (3, "fp32", False, True),
    "s3_bf16": (3, "bf16", False, True),
    "s0_fp16": (0, "fp16", False, True),
    "s3_fp16": (3, "fp16", False, False),
    "s2_frozen": (2, "fp32", True, False),
    "s3_frozen": (3, "fp32", True, True),
}
ZERO_RUNS = [name for name, (stage, *_) in RUNS.items() if stage > 0]


def fixed_batch() -> torch.Tensor:
    return torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(123))


def build_model(frozen: bool) -> GPT:
    torch.manual_seed(0)
    model = GPT(**GPT_ARGS)
    if frozen:
        model.wpe.weight.requires_grad_(False)
    return model


def train_and_save(rank: int, root: str) -> dict:
    """Each rank: per run, train 2 steps, save a checkpoint, record the outputs on a fixed batch."""
    import deepspeed

    from zeroloop import runtime
    from zeroloop.testing import fp16_on_cpu

    deepspeed.init_distributed()
    outputs = {}
    for name, (stage, precision, frozen, final) in RUNS.items():
        model = build_model(frozen)
        with fp16_on_cpu() if precision == "fp16" else contextlib.nullcontext():
            engine, *_ = deepspeed.initialize(model=model, config=tiny_config(stage=stage, precision=precision),
                                              model_parameters=[p for p in model.parameters() if p.requires_grad])
            runtime.unlink_own_shm_buffer()
            outputs.update(_train_and_save(engine, rank, root, name, precision, final))
    return outputs


def _train_and_save(engine, rank, root, name, precision, final) -> dict:
    from zeroloop.export import save_final_weights
    from zeroloop.testing import full_parameters

    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        x = torch.randint(0, 256, (2, 8), generator=g)
        engine.backward(engine(x, labels=x).loss)
        engine.step()
    engine.save_checkpoint(os.path.join(root, name))
    engine.eval()
    outputs = {}
    with torch.no_grad():
        # numpy, not a tensor: torch sends tensors through shared memory, which dies with the rank
        outputs[name] = engine(fixed_batch()).logits.float().numpy()
    if precision != "fp32":  # the engine's own half-precision weights (gathered, as fp32)
        outputs[f"{name}/params"] = {k: v.numpy() for k, v in full_parameters(engine).items()}
    if final:
        save_final_weights(engine, os.path.join(root, "final", name))
    return outputs


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(root folder, {run name: logits of the trained engine on fixed_batch()})."""
    root = str(tmp_path_factory.mktemp("ckpt"))
    outputs = run_ranks(train_and_save, 2, root, timeout=240)
    return root, {name: _to_torch(value) for name, value in outputs[0].items()}


def _to_torch(value):
    if isinstance(value, dict):
        return {k: torch.from_numpy(v) for k, v in value.items()}
    return torch.from_numpy(value)


def train_and_save_stages_1_and_3(rank: int, root: str) -> None:
    """Each rank: two runs (ZeRO-1 and ZeRO-3, fp32), for checkpoints written by 3 ranks."""
    import deepspeed

    from zeroloop import runtime

    deepspeed.init_distributed()
    for stage in (1, 3):
        model = build_model(frozen=False)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=tiny_config(stage=stage))
        runtime.unlink_own_shm_buffer()
        _train_and_save(engine, rank, root, f"s{stage}_fp32", "fp32", final=False)


@pytest.fixture(scope="module")
def three_rank_checkpoints(tmp_path_factory):
    """A folder with s1_fp32 and s3_fp32 checkpoints written by 3 ranks (uneven partitions)."""
    root = tmp_path_factory.mktemp("three_ranks")
    run_ranks(train_and_save_stages_1_and_3, 3, str(root), timeout=240)
    return root


@pytest.mark.multirank
@pytest.mark.parametrize("stage", [1, 3])
def test_three_ranks_match_zero_to_fp32(three_rank_checkpoints, tmp_path, stage):
    root = three_rank_checkpoints
    result = consolidate(root / f"s{stage}_fp32", tmp_path)
    assert result.world_size == 3 and result.stage == stage
    assert_bitwise_equal(load_state_dict(tmp_path), reference(str(root / f"s{stage}_fp32")))


def reference(path: str, **kwargs) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(path, **kwargs)


def assert_bitwise_equal(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype, name
        as_bytes = tensor.contiguous().view(-1).view(torch.uint8)
        assert torch.equal(ours[name].view(-1).view(torch.uint8), as_bytes), name


def model_outputs(state_dict: dict, frozen: bool = False, dtype=torch.float32) -> torch.Tensor:
    model = build_model(frozen).to(dtype)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks: the same summation order, the same rounding
    try:
        with torch.no_grad():
            return model(fixed_batch()).logits.float()
    finally:
        torch.set_num_threads(threads)


# --- exactness ----------------------------------------------------------------------------


@pytest.mark.multirank
@pytest.mark.parametrize("name", ZERO_RUNS)
def test_every_tensor_equals_zero_to_fp32_bit_for_bit(checkpoints, tmp_path, name):
    root, _ = checkpoints
    result = consolidate(os.path.join(root, name), tmp_path / "out")
    assert result.stage == RUNS[name][0] and result.world_size == 2
    assert_bitwise_equal(load_state_dict(tmp_path / "out"), reference(os.path.join(root, name)))


@pytest.mark.multirank
@pytest.mark.parametrize("name", ["s2_frozen", "s3_frozen"])
def test_exclude_frozen_matches_zero_to_fp32(checkpoints, tmp_path, name):
    root, _ = checkpoints
    consolidate(os.path.join(root, name), tmp_path, exclude_frozen=True)
    ours = load_state_dict(tmp_path)
    assert "wpe.weight" not in ours
    assert_bitwise_equal(ours, reference(os.path.join(root, name), exclude_frozen_parameters=True))


@pytest.mark.multirank
@pytest.mark.parametrize("name", [n for n, (_, precision, *_) in RUNS.items() if precision == "fp32"])
def test_fresh_model_gives_the_trained_engines_outputs(checkpoints, tmp_path, name):
    root, outputs = checkpoints
    consolidate(os.path.join(root, name), tmp_path)
    torch.testing.assert_close(model_outputs(load_state_dict(tmp_path), frozen=RUNS[name][2]), outputs[name],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.multirank
@pytest.mark.parametrize("name", [n for n, (_, precision, *_) in RUNS.items() if precision != "fp32"])
def test_half_precision_training_gives_fp32_masters_that_round_to_the_engines_weights(checkpoints, tmp_path,
                                                                                       name):
    root, engine = checkpoints
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[RUNS[name][1]]
    consolidate(os.path.join(root, name), tmp_path / "fp32")
    masters = load_state_dict(tmp_path / "fp32")
    assert all(t.dtype == torch.float32 for t in masters.values())
    # The masters rounded to half precision are the engine's weights, and so is that dtype's output.
    consolidate(os.path.join(root, name), tmp_path / "half", dtype=RUNS[name][1])
    rounded = load_state_dict(tmp_path / "half")
    assert engine[f"{name}/params"].keys() <= rounded.keys()
    for key, weight in engine[f"{name}/params"].items():
        assert rounded[key].dtype == half, key
        assert torch.equal(rounded[key], masters[key].to(half)), key
        assert torch.equal(rounded[key].float(), weight), key
    model_outputs(rounded, dtype=half)  # loads strict


@pytest.mark.multirank
@pytest.mark.parametrize("name", ["s0_bf16", "s0_fp16"])
def test_stage0_half_precision_reads_the_fp32_masters_not_the_module(checkpoints, tmp_path, name):
    root, _ = checkpoints
    consolidate(os.path.join(root, name), tmp_path)
    masters = load_state_dict(tmp_path)
    tag = open(os.path.join(root, name, "latest")).read().strip()
    flat = torch.load(os.path.join(root, name, tag, "mp_rank_00_model_states.pt"),
                      weights_only=False)["optimizer"]["fp32_groups_flat"][0]
    stored = [masters[name] for name in build_model(False).state_dict() if name != "lm_head.weight"]
    assert torch.equal(torch.cat([t.reshape(-1) for t in stored]), flat.detach())


@pytest.mark.multirank
@pytest.mark.parametrize("name", [n for n, (*_, final) in RUNS.items() if final])
def test_save_final_weights_writes_what_consolidate_writes(checkpoints, tmp_path, name):
    root, _ = checkpoints
    consolidate(os.path.join(root, name), tmp_path)
    assert_bitwise_equal(load_state_dict(os.path.join(root, "final", name)), load_state_dict(tmp_path))


def test_save_final_weights_of_a_plain_module(tmp_path):
    from zeroloop.export import save_final_weights

    model = build_model(frozen=True)
    result = save_final_weights(model, tmp_path, max_shard_size="4KB")
    assert len(result.files) > 1 and result.ties == {"lm_head.weight": "wte.weight"}
    loaded = load_state_dict(tmp_path)
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


# --- format ---------------------------------------------------------------------------------


@pytest.mark.multirank
def test_tied_weight_is_stored_once_and_restored(checkpoints, tmp_path):
    root, _ = checkpoints
    result = consolidate(os.path.join(root, "s3_fp32"), tmp_path)
    assert result.ties == {"lm_head.weight": "wte.weight"}
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:
        assert "lm_head.weight" not in f.keys() and "wte.weight" in f.keys()
        assert json.loads(f.metadata()["tied_weights"]) == {"lm_head.weight": "wte.weight"}
    state_dict = load_state_dict(tmp_path)
    assert state_dict["lm_head.weight"] is state_dict["wte.weight"]
    expected = list(build_model(False).state_dict())
    assert list(state_dict) == [k for k in expected if k != "lm_head.weight"] + ["lm_head.weight"]


@pytest.mark.multirank
def test_small_max_shard_size_writes_shards_and_an_index(checkpoints, tmp_path, monkeypatch):
    root, _ = checkpoints
    monkeypatch.setattr(zero_layout, "CHUNK_NUMEL", 100)  # several chunks per piece, as with large models
    result = consolidate(os.path.join(root, "s3_fp32"), tmp_path, max_shard_size="4KB")
    assert len(result.files) > 2 and result.files[0] == f"model-00001-of-{len(result.files):05d}.safetensors"
    assert not (tmp_path / WEIGHTS_NAME).exists()
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(result.files)
    assert index["metadata"]["total_size"] == result.total_size
    assert index["metadata"]["tied_weights"] == {"lm_head.weight": "wte.weight"}
    for file in result.files:
        with safe_open(str(tmp_path / file), framework="pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
            nbytes = sum(4 * torch.Size(s).numel() for s in sizes)
            assert nbytes <= 4000 or len(sizes) == 1  # a tensor bigger than a shard gets its own file
    assert_bitwise_equal(load_state_dict(tmp_path), reference(os.path.join(root, "s3_fp32")))


@pytest.mark.multirank
def test_rerun_replaces_earlier_weights_and_keeps_other_files(checkpoints, tmp_path):
    root, _ = checkpoints
    consolidate(os.path.join(root, "s1_fp32"), tmp_path, max_shard_size="4KB")
    (tmp_path / "config.json").write_text("{}")
    consolidate(os.path.join(root, "s1_fp32"), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", WEIGHTS_NAME]


@pytest.mark.multirank
def test_tag_folder_and_explicit_tag_read_the_same_weights(checkpoints, tmp_path):
    root, _ = checkpoints
    consolidate(os.path.join(root, "s2_fp32", "global_step2"), tmp_path / "a")
    consolidate(os.path.join(root, "s2_fp32"), tmp_path / "b", tag="global_step2")
    assert_bitwise_equal(load_state_dict(tmp_path / "a"), load_state_dict(tmp_path / "b"))


@pytest.mark.multirank
def test_cli_writes_weights(checkpoints, tmp_path, capsys):
    root, _ = checkpoints
    code = cli_main(["consolidate", os.path.join(root, "s2_bf16"), str(tmp_path), "--dtype", "fp16",
                     "--max-shard-size", "8KB", "--no-progress"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["stage"] == 2 and len(report["files"]) > 1
    assert all(t.dtype == torch.float16 for t in load_state_dict(tmp_path).values())


# --- errors ---------------------------------------------------------------------------------


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="not a DeepSpeed checkpoint folder.*latest"):
        consolidate(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        consolidate(tmp_path / "missing", tmp_path / "out")


@pytest.mark.multirank
def test_missing_rank_file_names_it_and_the_count(checkpoints, tmp_path):
    root, _ = checkpoints
    for name, victim in [("s2_fp32", "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
                         ("s3_bf16", "zero_pp_rank_1_mp_rank_00_model_states.pt")]:
        broken = tmp_path / name
        shutil.copytree(os.path.join(root, name), broken)
        os.remove(broken / "global_step2" / victim)
        with pytest.raises(CheckpointNotFoundError, match=f"missing 1 of 2 rank files: {victim}"):
            consolidate(broken, tmp_path / "out")
        assert not (tmp_path / "out").exists()


@pytest.mark.multirank
def test_rank_files_of_a_larger_run_are_refused(checkpoints, tmp_path):
    root, _ = checkpoints
    mixed = tmp_path / "mixed"
    shutil.copytree(os.path.join(root, "s2_fp32"), mixed)
    tag_dir = mixed / "global_step2"
    shutil.copy(tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                tag_dir / "zero_pp_rank_2_mp_rank_00_optim_states.pt")  # left over from a 3-rank run
    with pytest.raises(CheckpointError, match="ranks up to 2, but the checkpoint was written by 2 ranks"):
        consolidate(mixed, tmp_path / "out")


@pytest.mark.multirank
def test_unknown_tag_lists_the_tags(checkpoints, tmp_path):
    root, _ = checkpoints
    with pytest.raises(CheckpointNotFoundError, match="tag 'global_step9'.*global_step2"):
        consolidate(os.path.join(root, "s1_fp32"), tmp_path, tag="global_step9")


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype="int8"), "unknown output dtype 'int8'; use fp32, bf16 or fp16"),
    (dict(max_shard_size="5 parsecs"), "cannot read '5 parsecs' as a size"),
    (dict(max_shard_size=0), "at least 1 byte"),
])
@pytest.mark.multirank
def test_bad_arguments(checkpoints, tmp_path, kwargs, match):
    root, _ = checkpoints
    with pytest.raises(CheckpointError, match=match):
        consolidate(os.path.join(root, "s1_fp32"), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.multirank
def test_unwritable_output_folder(checkpoints, tmp_path):
    root, _ = checkpoints
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match="cannot write the output folder.*a_file"):
        consolidate(os.path.join(root, "s1_fp32"), blocker / "out")
    with pytest.raises(CheckpointError, match="is an existing file"):
        consolidate(os.path.join(root, "s1_fp32"), blocker)


@pytest.mark.multirank
def test_failed_run_leaves_no_output(checkpoints, tmp_path, monkeypatch):
    root, _ = checkpoints
    calls = []

    def fail_on_third_write(self, *args):
        calls.append(args)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(self, *args)

    original = safetensors_io.SafetensorsWriter.write
    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write", fail_on_third_write)
    with pytest.raises(OSError, match="disk full"):
        consolidate(os.path.join(root, "s3_fp32"), tmp_path / "out", max_shard_size="4KB")
    assert os.listdir(tmp_path) == []  # neither the output nor the staging folder


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    assert cli_main(["consolidate", str(tmp_path), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "not a DeepSpeed checkpoint folder" in capsys.readouterr().err


def test_shard_size_units():
    assert parse_shard_size("5GB") == 5 * 10**9
    assert parse_shard_size("2GiB") == 2 * 2**30
    assert parse_shard_size("1.5MB") == 1_500_000
    assert parse_shard_size(4096) == 4096


class _Crash(BaseException):
    """A crash at a chosen point of publish (not an OSError: nothing may handle it)."""


@pytest.mark.parametrize("before,after", [("single", "single"), ("sharded", "sharded"), ("single", "sharded"),
                                          ("sharded", "single")])
def test_a_crash_while_publishing_leaves_the_earlier_or_the_new_weights(tmp_path, monkeypatch, before, after):
    from zeroloop.export import save_final_weights
    from zeroloop.safetensors_io import publish

    shard_size = {"single": "5GB", "sharded": "4KB"}
    save_final_weights(build_model(frozen=False), tmp_path / "earlier", max_shard_size=shard_size[before])
    model = build_model(frozen=False)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # other weights, the same names and shapes
    save_final_weights(model, tmp_path / "new", max_shard_size=shard_size[after])
    earlier, new = load_state_dict(tmp_path / "earlier"), load_state_dict(tmp_path / "new")
    assert not any(torch.equal(earlier[k], new[k]) for k in new)
    replace, remove = os.replace, os.remove
    crash_after, changes = 0, []

    def counted(operation):
        def run(*args):
            if len(changes) == crash_after:
                raise _Crash()
            changes.append(args)
            operation(*args)
        return run

    monkeypatch.setattr(os, "replace", counted(replace))
    monkeypatch.setattr(os, "remove", counted(remove))
    while True:  # crash after 0, 1, 2, ... changes, until publish runs to the end
        out, staging = tmp_path / f"out{crash_after}", tmp_path / f"staging{crash_after}"
        shutil.copytree(tmp_path / "earlier", out)
        shutil.copytree(tmp_path / "new", staging)
        changes.clear()
        try:
            publish(str(staging), out)
            finished = True
        except _Crash:
            finished = False
        try:
            found = load_state_dict(out)
        except CheckpointNotFoundError:
            # Only one sharded set replacing another has a moment without an index.
            assert (before, after) == ("sharded", "sharded") and not finished
        else:
            assert found.keys() == new.keys()
            assert all(torch.equal(found[k], new[k]) for k in new) or \
                all(torch.equal(found[k], earlier[k]) for k in earlier), f"a mix after {crash_after} changes"
            if finished:
                assert all(torch.equal(found[k], new[k]) for k in new)
                assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "new"))
                break
        crash_after += 1
