"""Any DeepSpeed checkpoint as DeepSpeed's universal checkpoint, written streaming.

DeepSpeed's per-rank ZeRO files load only into the layout that wrote them. Its universal
checkpoint stores every trained parameter whole, one folder per parameter::

    <tag>.universal/
        zero/<param name>/fp32.pt          {"param": full fp32 master weight}
        zero/<param name>/exp_avg.pt       {"param": full first moment}
        zero/<param name>/exp_avg_sq.pt    {"param": full second moment}
        zero/<param name>/step.pt          the optimizer's step count
        zero/optimizer_state.pt            param groups, loss scaler, clipping
        mp_rank_00_model_states.pt         LR scheduler, step counters, buffers (no weights)
        zero_pp_rank_0_mp_rank_00_model_states.pt   the same file, under ZeRO-3's name
        zeroloop_universal.json            written last: the source and every file's size

and DeepSpeed's ZeRO 1-3 optimizers load it into any world size (each rank cuts its own
partition; :mod:`zeroloop.universal_load`). :func:`convert_to_universal` writes it from a checkpoint of any stage 0-3,
precision and world size. It reads the source through the consolidation reader
(:func:`zeroloop.zero_layout.read_layout`): every file memory-mapped, one parameter
assembled at a time, its pages dropped once copied, so the peak memory is the largest
parameter on top of the interpreter, whatever the model's size. DeepSpeed's own
``ds_to_universal`` loads whole rank files in several worker processes and writes every
fragment twice (a temporary folder, then the merged one).

Where the layout differs from that of ``ds_to_universal``'s output: the model-states file
keeps the buffers but not the weights (the universal loaders never read weights from it),
it exists under both the ZeRO 1-2 and the ZeRO-3 name (so any stage loads it), and
``optimizer_state.pt`` holds the keys both loaders read. Frozen parameters are left out:
DeepSpeed's universal loaders restore only what the optimizer trains.

"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import CheckpointError
from .manifest import FORMAT, UNIVERSAL_SUFFIX, universal_sibling
from .saving import folder_files, fsync_path, write_json_durably
from .version import __version__
from .zero_layout import (MODEL_FILE, OPTIM_FILE_RE, OPTIMIZER_STATE, ZERO3_FP32_GROUPS, ZERO3_MODEL_FILE,
                          ZERO12_FP32_GROUPS, Piece, chunks, drop_pages, find_model_file, load_mapped, lookup,
                          read_layout)

log = logging.getLogger("zeroloop")

UNIVERSAL_MANIFEST = "zeroloop_universal.json"
UNIVERSAL_FORMAT = "zeroloop-universal/1"
PARTIAL_SUFFIX = ".tmp"  # a conversion still being written (or killed); never loaded
MOMENTS = ("exp_avg", "exp_avg_sq")
MODEL_STATES_NAMES = (MODEL_FILE, ZERO3_MODEL_FILE.format(rank=0))
OPTIMIZER_STATE_FILE = os.path.join("zero", "optimizer_state.pt")
PARAM = "param"  # deepspeed.checkpoint.constants.PARAM: the tensor's key in a universal file
# Keys of a ZeRO optimizer's state that carry over unchanged (the loss scaler object with
# its scale, hysteresis and iteration counters; the clipping it was saved with).
GLOBAL_STATE_KEYS = ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad")


@dataclass
class UniversalParam:
    """One trained parameter: where its master weight and moments are in the source files."""

    name: str
    shape: tuple[int, ...]
    pieces: dict[str, list[Piece] | None] = field(default_factory=dict)  # "fp32", "exp_avg"... (None: zeros)

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass
class UniversalPlan:
    """What :func:`write_params` and :func:`write_common` write for one source checkpoint."""

    tag_dir: str
    stage: int
    world_size: int
    params: list[UniversalParam]
    step: Any  # the optimizer's step count (an int, or a tensor for torch's optimizers)
    optimizer_state: dict[str, Any]
    model_states: dict[str, Any]
    files: _Files


class _Files:
    """Each source file loaded once, memory-mapped (its tensors are read only when touched)."""

    def __init__(self):
        self.loaded: dict[str, Any] = {}

    def get(self, path: str) -> Any:
        if path not in self.loaded:
            self.loaded[path] = load_mapped(path)
        return self.loaded[path]

    def tensor(self, piece: Piece) -> torch.Tensor:
        return lookup(self.get(piece.file), piece.keys)


# --- the conversion ------------------------------------------------------------------------


def convert_to_universal(tag_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> str:
    """Write DeepSpeed's universal checkpoint of ``tag_dir`` (any stage, precision, world size).

    Written under ``<output_dir>.tmp`` and renamed into place once complete, its manifest
    last, so that a crash never leaves a folder that looks complete.

    Args:
        tag_dir: a checkpoint's tag folder (holding ``*_model_states.pt``).
        output_dir: where to write it; default the sibling ``<tag_dir>.universal``. An
            existing folder there is replaced.

    Returns:
        The universal folder.

    Raises:
        CheckpointError: the checkpoint cannot be read or mapped (the message says why).
    """
    tag_dir = os.path.abspath(os.fspath(tag_dir))
    final = os.path.abspath(os.fspath(output_dir)) if output_dir else universal_sibling(tag_dir)
    staging = f"{final}{PARTIAL_SUFFIX}"
    shutil.rmtree(staging, ignore_errors=True)
    plan = plan_universal(tag_dir)
    write_params(plan, staging)
    write_common(plan, staging)
    if os.path.exists(final):
        shutil.rmtree(final)
    publish(staging, final, plan)
    return final


def convert_collectively(tag_dir: str, *, rank: int, world_size: int, barrier: Callable[[], None],
                         all_ok: Callable[[bool], bool]) -> str:
    """Write the universal sibling of ``tag_dir``, the work shared between the ranks.

    Collective: every rank calls it. Each writes its share of the parameters (dealt by
    size), then rank 0 writes the common files and publishes. Whatever is left of an
    earlier, interrupted conversion (``<tag>.universal.tmp``) is removed first.

    Args:
        barrier: waits for every rank.
        all_ok: True on every rank when it is True on every rank (an all-reduce).

    Returns:
        The universal folder.

    Raises:
        CheckpointError: on every rank, when any rank could not write its share.
    """
    final = universal_sibling(tag_dir)
    staging = f"{final}{PARTIAL_SUFFIX}"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # incomplete: it has no valid manifest
        log.info("converting %s to a universal checkpoint in %s (once; later resumes reuse it)", tag_dir, final)
    barrier()
    problem = None
    try:
        plan = plan_universal(tag_dir)
        write_params(plan, staging, share=(rank, world_size))
    except (CheckpointError, OSError) as e:
        problem = e
    if not all_ok(problem is None):
        raise CheckpointError(f"converting {tag_dir} to a universal checkpoint failed"
                              f"{f': {problem}' if problem else ' on another rank'}") from problem
    if rank == 0:
        write_common(plan, staging)
        publish(staging, final, plan)
    barrier()
    return final


def plan_universal(tag_dir: str) -> UniversalPlan:
    """Where every trained parameter's master weight and moments live in ``tag_dir``'s files.

    Raises:
        CheckpointError: a rank file is missing, or the files do not add up.
    """
    layout = read_layout(tag_dir)
    files = _Files()
    meta = files.get(find_model_file(tag_dir))
    buffers = set(meta.get("buffer_names") or ())
    frozen = set(meta.get("frozen_param_shapes") or ())
    trained = [e for e in layout.entries if e.name not in buffers and e.name not in frozen]
    stage0_index = {entry.name: i for i, entry in enumerate(trained)}  # the optimizer's order at stage 0
    if layout.stage == 0:
        _check_stage0_order(meta, trained, tag_dir)
    params, steps = [], []
    for entry in trained:
        param = UniversalParam(entry.name, tuple(entry.shape), {"fp32": entry.pieces})
        for moment in MOMENTS:
            param.pieces[moment] = _moment_pieces(files, entry.pieces, moment, stage0_index[entry.name])
        params.append(param)
        steps += [_step_near(files, p, stage0_index[entry.name]) for p in entry.pieces]
    steps = [s for s in steps if s is not None]
    step = max(steps, key=float) if steps else 0  # FusedAdam counts on its group's last tensor only
    return UniversalPlan(tag_dir=tag_dir, stage=layout.stage, world_size=layout.world_size, params=params,
                         step=step, optimizer_state=_optimizer_state(files, tag_dir, meta, layout.stage, step),
                         model_states=_model_states(meta, buffers), files=files)


def _check_stage0_order(meta: dict, trained: list, tag_dir: str) -> None:
    """At stage 0 the optimizer's tensors are matched to the module's trained parameters by
    order: refuse when their counts differ (frozen parameters cannot be told apart there)."""
    optimizer = meta.get("optimizer") or {}
    groups = (optimizer.get("optimizer_state_dict") or optimizer).get("param_groups")
    if groups is None or "fp32_groups_flat" in optimizer:
        return  # FP16_Optimizer: the flat groups were checked by read_layout
    count = sum(len(group["params"]) for group in groups)
    if count != len(trained):
        raise CheckpointError(f"{tag_dir}: the optimizer holds {count} tensors but the module has {len(trained)} "
                              "parameters; a stage-0 checkpoint whose optimizer does not hold every parameter of "
                              "model.parameters() in order (frozen ones, or several models) cannot be converted")


def _moment_keys(keys: tuple, moment: str, index: int) -> list[tuple]:
    """Where a moment may sit, given where the master weight's piece is (same offsets)."""
    if keys[:2] == (OPTIMIZER_STATE, ZERO12_FP32_GROUPS):  # the base optimizer's state, or its elastic list
        return [(OPTIMIZER_STATE, "base_optimizer_state", "state", keys[2], moment),
                (OPTIMIZER_STATE, "base_optimizer_state", keys[2], moment)]
    if keys[:2] == (OPTIMIZER_STATE, ZERO3_FP32_GROUPS):
        return [(OPTIMIZER_STATE, "optimizer_state_dict", "state", keys[2], moment)]
    if keys[:2] == ("optimizer", "fp32_groups_flat"):  # stage 0 bf16/fp16: FP16_Optimizer
        return [("optimizer", "optimizer_state_dict", "state", keys[2], moment)]
    if keys[0] == "module":  # stage 0 fp32: the torch-style optimizer state, one entry per param
        return [("optimizer", "state", index, moment)]
    raise CheckpointError(f"no optimizer state is known for a weight stored at {keys}")


def _moment_pieces(files: _Files, pieces: list[Piece], moment: str, index: int) -> list[Piece] | None:
    """The pieces of a moment, or None when the optimizer holds no state for that tensor
    yet (saved before its first update: zeros, as Adam starts).

    Raises:
        CheckpointError: the optimizer state is not where any known layout puts it.
    """
    moved = []
    for piece in pieces:
        candidates = _moment_keys(piece.keys, moment, index)
        keys = next((k for k in candidates if _lookup_or_none(files.get(piece.file), k) is not None), None)
        if keys is None:
            state = _lookup_or_none(files.get(piece.file), candidates[0][:-2])
            if isinstance(state, dict) and candidates[0][-2] not in state:
                return None  # no state for this tensor: it was never updated
            raise CheckpointError(f"{piece.file}: no {moment} found at {candidates[0]}; this optimizer's state "
                                  "is laid out in a way the conversion does not know")
        moved.append(Piece(piece.file, keys, piece.src_offset, piece.dst_offset, piece.numel))
    return moved


def _lookup_or_none(state: Any, keys: tuple) -> Any:
    try:
        return lookup(state, keys)
    except (KeyError, IndexError, TypeError):
        return None


def _step_near(files: _Files, piece: Piece, index: int) -> Any:
    state = files.get(piece.file)
    return next((step for keys in _moment_keys(piece.keys, "step", index)
                 if (step := _lookup_or_none(state, keys)) is not None), None)


def _optimizer_state(files: _Files, tag_dir: str, meta: dict, stage: int, step: Any) -> dict[str, Any]:
    """``zero/optimizer_state.pt``: what the stage 1-2 and the stage-3 loaders both read."""
    import deepspeed

    if stage == 0:
        source = meta.get("optimizer") or {}
        groups = (source.get("optimizer_state_dict") or source).get("param_groups", [])
    else:
        first = _first_optim_file(tag_dir)
        source = files.get(first)[OPTIMIZER_STATE]
        base = source.get("base_optimizer_state", source.get("optimizer_state_dict"))
        groups = base["param_groups"] if isinstance(base, dict) else source.get("param_groups", [])
    groups = [dict(group) for group in groups]
    state = {key: source[key] for key in GLOBAL_STATE_KEYS if key in source}
    if stage == 0 and "cur_scale" in source:  # FP16_Optimizer keeps its scaler as loose fields
        state.update(_stage0_loss_scaler(source, meta.get("ds_config") or {}))
    state.update({"param_groups": groups, "optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": groups},
                  "zero_stage": stage, "ds_version": deepspeed.__version__})
    return state


def _first_optim_file(tag_dir: str) -> str:
    names = sorted((int(m.group(1)), name) for name in os.listdir(tag_dir) if (m := OPTIM_FILE_RE.match(name)))
    return os.path.join(tag_dir, names[0][1])


def _stage0_loss_scaler(source: dict, ds_config: dict) -> dict[str, Any]:
    """FP16_Optimizer's loose scaler fields as the scaler object the ZeRO optimizers load.

    Its scale, iteration count and last overflow carry over; FP16_Optimizer keeps no
    hysteresis count, so the new scaler starts with the configured one.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

    fp16 = ds_config.get("fp16") or {}
    if not source.get("dynamic_loss_scale"):
        return {"loss_scaler": LossScaler(scale=source["cur_scale"]), "dynamic_loss_scale": False}
    scaler = DynamicLossScaler(init_scale=source["cur_scale"], scale_window=source.get("scale_window", 1000),
                               min_scale=fp16.get("min_loss_scale", 1), delayed_shift=fp16.get("hysteresis", 2),
                               consecutive_hysteresis=fp16.get("consecutive_hysteresis", False),
                               dtype=torch.float16)
    scaler.scale_factor = source.get("scale_factor", scaler.scale_factor)
    scaler.cur_iter = source.get("cur_iter", 0)
    scaler.last_overflow_iter = source.get("last_overflow_iter", -1)
    return {"loss_scaler": scaler, "dynamic_loss_scale": True}


def _model_states(meta: dict, buffers: set) -> dict[str, Any]:
    """The model-states dict without weights or optimizer (buffers kept: nothing else holds them)."""
    states = {key: value for key, value in meta.items() if key not in ("module", "optimizer")}
    module = meta.get("module") or {}
    states["module"] = {name: module[name] for name in module if name in buffers}
    states["optimizer"] = None
    states["universal_checkpoint_info"] = {"universal_checkpoint_version": 0.2}
    return states


def write_params(plan: UniversalPlan, staging: str, share: tuple[int, int] = (0, 1)) -> list[str]:
    """Write this share's parameter folders under ``staging/zero`` (fsynced).

    Args:
        share: ``(index, count)``: parameters are dealt to ``count`` writers by size, and
            this one writes those dealt to ``index``.

    Returns:
        The files written, relative to ``staging``.
    """
    written = []
    for param in _dealt(plan.params, *share):
        folder = os.path.join(staging, "zero", param.name)
        os.makedirs(folder, exist_ok=True)
        for key, pieces in param.pieces.items():
            tensor = _assemble(plan.files, param, pieces)
            written.append(_save(folder, f"{key}.pt", {PARAM: tensor}))
            del tensor
        written.append(_save(folder, "step.pt", plan.step))
    _flush(staging, written)
    return [os.path.relpath(path, staging) for path in written]


def _dealt(params: list[UniversalParam], index: int, count: int) -> list[UniversalParam]:
    """The parameters writer ``index`` of ``count`` takes: largest first, to the least loaded."""
    loads, mine = [0] * count, []
    for param in sorted(params, key=lambda p: (-p.numel, p.name)):
        writer = loads.index(min(loads))
        loads[writer] += param.numel
        if writer == index:
            mine.append(param)
    return mine


def _assemble(files: _Files, param: UniversalParam, pieces: list[Piece] | None) -> torch.Tensor:
    """One full tensor of ``param`` from its pieces (zeros when there are none)."""
    if pieces is None:
        return torch.zeros(param.shape, dtype=torch.float32)
    dtype = files.tensor(pieces[0]).dtype
    out = torch.empty(param.numel, dtype=dtype)
    for piece in pieces:
        source = files.tensor(piece).reshape(-1)
        for start, chunk in chunks(source, piece.src_offset, piece.numel):
            out.narrow(0, piece.dst_offset + start, chunk.numel()).copy_(chunk)
            drop_pages(chunk)
        _drop_storage(source)
    return out.view(param.shape)


def _drop_storage(source: torch.Tensor) -> None:
    """Unmap every page of a memory-mapped source storage that a copy brought in.

    A fault on a mapped file maps the whole page-cache folio around it (up to megabytes on
    recent kernels), not one page: copying a small parameter out of a large flat group
    would leave about 1 MiB mapped each time (700 MiB over a 300M-parameter model). The
    storage is read only, so its pages are clean and are read again if touched later.
    """
    storage = source.untyped_storage()
    if storage.nbytes():
        drop_pages(torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),)))


def _save(folder: str, name: str, value: Any) -> str:
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        torch.save(value, f)
    return path


def _flush(staging: str, paths: list[str]) -> None:
    """Put ``paths`` (and their folders) on disk before anything names them complete: one
    ``syncfs`` of the file system on Linux (a flush per file costs ~5 ms each, and a large
    model has thousands), else an fsync of each."""
    import ctypes
    import sys


    os.makedirs(staging, exist_ok=True)
    if sys.platform.startswith("linux"):
        fd = os.open(staging, os.O_RDONLY)
        try:
            if ctypes.CDLL(None, use_errno=True).syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    for path in paths + sorted({os.path.dirname(p) for p in paths}):
        fsync_path(path)


def write_common(plan: UniversalPlan, staging: str) -> None:
    """``zero/optimizer_state.pt`` and the model-states file under both names (on disk)."""
    os.makedirs(os.path.join(staging, "zero"), exist_ok=True)
    written = [_save(os.path.join(staging, "zero"), "optimizer_state.pt", plan.optimizer_state),
               _save(staging, MODEL_STATES_NAMES[0], plan.model_states)]
    second = os.path.join(staging, MODEL_STATES_NAMES[1])
    try:
        os.link(written[1], second)  # one file, two names
    except OSError:
        shutil.copyfile(written[1], second)
    _flush(staging, written + [second])


def publish(staging: str, final: str, plan: UniversalPlan) -> dict[str, Any]:
    """Write the manifest (listing every file and its size) last, then rename into place
    (every file is on disk already: :func:`write_params` and :func:`write_common` flushed)."""

    manifest = {"format": UNIVERSAL_FORMAT, "source": os.path.basename(plan.tag_dir),
                "source_zero_stage": plan.stage, "source_world_size": plan.world_size,
                "params": len(plan.params), "zeroloop": __version__, "files": folder_files(staging)}
    write_json_durably(os.path.join(staging, UNIVERSAL_MANIFEST), manifest)
    os.rename(staging, final)
    fsync_path(os.path.dirname(final))
    return manifest


# --- reading ---------------------------------------------------------------------------------


def read_universal_manifest(folder: str, quiet: bool = False) -> dict[str, Any] | None:
    """The manifest of a complete conversion, after checking every file it lists.

    Returns:
        The manifest; None when ``quiet`` and the folder is missing or incomplete.

    Raises:
        CheckpointError: (unless ``quiet``) the folder, its manifest or a listed file is
            missing, or a file has another size than listed.
    """
    try:
        path = os.path.join(folder, UNIVERSAL_MANIFEST)
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder} is not a complete universal conversion: {UNIVERSAL_MANIFEST} is missing")
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        for name, size in manifest["files"].items():
            actual = os.path.getsize(os.path.join(folder, name)) if os.path.isfile(os.path.join(folder, name)) else None
            if actual != size:
                raise CheckpointError(f"{os.path.join(folder, name)} is {actual} bytes, the manifest says {size}")
        return manifest
    except (CheckpointError, OSError, ValueError, KeyError, TypeError) as e:
        if quiet:
            log.debug("no usable universal conversion in %s: %s", folder, e)
            return None
        raise CheckpointError(str(e)) from None


def is_deepspeed_universal(folder: str) -> bool:
    """A universal checkpoint folder (DeepSpeed's ``ds_to_universal`` or zeroloop's)."""
    return os.path.isfile(os.path.join(folder, OPTIMIZER_STATE_FILE)) and \
        any(os.path.isfile(os.path.join(folder, name)) for name in MODEL_STATES_NAMES)


def deepspeed_universal_manifest(folder: str) -> dict[str, Any]:
    """A manifest for a universal checkpoint without zeroloop's (``ds_to_universal``'s output).

    DeepSpeed records its step and sample counts, the world size and the config in the
    model-states file (unpickled here: load checkpoints only from sources you trust). It
    records no data position: the loop continues at sample ``global_samples`` of the
    global order, and no per-rank RNG states: each rank is re-seeded.

    Raises:
        CheckpointError: the model-states file is missing or lacks DeepSpeed's counters.
    """

    path = model_states_file(folder)
    try:
        states = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        config = states.get("ds_config") or {}
        world, steps = int(states["dp_world_size"]), int(states["global_steps"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a DeepSpeed model-states file with its step counters ({e})") from None
    micro = int(config.get("train_micro_batch_size_per_gpu") or 1)
    accum = int(config.get("gradient_accumulation_steps") or 1)
    total = int(config.get("train_batch_size") or micro * accum * world)
    samples = int(states.get("global_samples") or steps * total)
    stage = int((config.get("zero_optimization") or {}).get("stage", 0))
    train_state = {"step": steps, "epoch": 0, "epoch_samples": samples, "micro_steps": samples // (micro * world),
                   "samples": samples, "tokens": None, "skipped_micro_batches": 0}
    return {"format": FORMAT, "universal": True, "tag": os.path.basename(os.path.normpath(folder)),
            "global_step": steps, "train_state": train_state, "world_size": world, "zero_stage": stage,
            "micro_batch_size": micro, "gradient_accumulation_steps": accum, "train_batch_size": total,
            "total_steps": None, "sampler_seed": None, "samples_per_epoch": None,
            "ds_config": json.loads(json.dumps(config, default=str)), "files": {}, "rank_files": []}


def model_states_file(folder: str) -> str:
    for name in MODEL_STATES_NAMES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise CheckpointError(f"{folder} holds neither {MODEL_STATES_NAMES[0]} nor {MODEL_STATES_NAMES[1]}")


__all__ = ["UNIVERSAL_SUFFIX", "convert_collectively", "convert_to_universal", "deepspeed_universal_manifest",
           "is_deepspeed_universal", "read_universal_manifest", "universal_sibling"]
