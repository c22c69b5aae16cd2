"""Turn a DeepSpeed checkpoint (ZeRO stage 0-3, fp32/bf16/fp16, any world size) into
Hugging Face-layout safetensors weights, streaming.

Read :func:`consolidate` top to bottom. It works in three steps:

1. **Layout**: from the checkpoint's small pickles (loaded with ``mmap=True``, so no
   tensor data is read), find where every element of every weight lives: which rank
   file, which flat fp32 group, at which offset. DeepSpeed's own
   ``deepspeed/utils/zero_to_fp32.py`` documents the formats this follows.
2. **Plan**: split the weights into output shards of at most ``max_shard_size`` bytes
   and write each shard's safetensors header up front (every shape is known).
3. **Copy**: visit the source files one at a time and ``pwrite`` each piece of each
   weight to its place in its shard, converted to the output dtype in bounded chunks.
   Pages of the mapped source are dropped once copied, so the peak memory is one chunk
   (``CHUNK_NUMEL`` elements) on top of the interpreter: it does not grow with the model.

Everything is written into a temporary folder next to ``output_dir`` and moved into
place at the end; a failed run leaves no output that looks complete.

Tied weights (``lm_head.weight`` sharing ``wte.weight``) are stored once; the ties go in
each file's safetensors metadata and in the index under ``metadata.tied_weights``.
:func:`load_state_dict` restores every key, so ``model.load_state_dict(sd)`` works strict.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import logging
import math
import mmap
import os
import re
import shutil
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from . import runtime
from .errors import CheckpointError, CheckpointNotFoundError
from .memory import parse_size as parse_bytes
from .pretrained import copy_pretrained_configs, save_pretrained_configs

log = logging.getLogger("zeroloop")

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
TIES_KEY = "tied_weights"  # safetensors metadata / index metadata key: JSON {alias: stored name}
# Elements converted per copy (16 Mi = 64 MiB of fp32): bounds the working memory.
CHUNK_NUMEL = 16 * 1024 * 1024

OUTPUT_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}

# Keys of DeepSpeed's checkpoint dicts (deepspeed.checkpoint.constants).
OPTIMIZER_STATE = "optimizer_state_dict"
ZERO12_FP32_GROUPS = "single_partition_of_fp32_groups"
ZERO3_FP32_GROUPS = "fp32_flat_groups"

MODEL_FILE = "mp_rank_00_model_states.pt"
ZERO3_MODEL_FILE = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
OPTIM_FILE_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


@dataclass(frozen=True)
class ConsolidateResult:
    """What :func:`consolidate` wrote.

    Attributes:
        output_dir: the folder holding the weights.
        files: the safetensors files written, in order (names inside ``output_dir``).
        total_size: bytes of tensor data over all files (tied weights counted once).
        num_tensors: tensors stored (tied aliases not counted).
        ties: ``{alias: stored name}`` for tied weights.
        stage: the checkpoint's ZeRO stage.
        world_size: ranks that wrote it.
        tag: the tag folder read.
    """

    output_dir: str
    files: list[str]
    total_size: int
    num_tensors: int
    ties: dict[str, str]
    stage: int
    world_size: int
    tag: str


# --- the public functions -----------------------------------------------------------------


def consolidate(checkpoint_dir: str | os.PathLike, output_dir: str | os.PathLike, *, tag: str | None = None,
                dtype: str | torch.dtype = "fp32", max_shard_size: int | str = "5GB",
                exclude_frozen: bool = False, progress: bool = False) -> ConsolidateResult:
    """Write the weights of a DeepSpeed checkpoint as Hugging Face-layout safetensors.

    Args:
        checkpoint_dir: the folder given to ``engine.save_checkpoint`` (holding ``latest``
            and one folder per tag), or a tag folder itself.
        output_dir: where ``model.safetensors`` (or the shards and
            ``model.safetensors.index.json``) go, with the ``config.json`` and
            ``generation_config.json`` the checkpoint holds (zeroloop saves them with the
            checkpoints of Hugging Face models, so ``from_pretrained(output_dir)`` works);
            created if missing. Earlier weight files there are replaced; other files are
            left alone.
        tag: the tag folder to read (e.g. ``"global_step100"``); default: the one named in
            ``latest``.
        dtype: "fp32", "bf16" or "fp16" for the floating-point tensors (integer and bool
            buffers keep their dtype). The fp32 master weights are the source.
        max_shard_size: the largest shard, in bytes or as a string ("5GB" = 5*10^9 bytes,
            "2GiB" = 2*2^30). A single tensor larger than this gets a shard of its own.
        exclude_frozen: leave out parameters that were not trained (``requires_grad=False``).
        progress: show a tqdm progress bar over the bytes written.

    Returns:
        A :class:`ConsolidateResult` describing the files written.

    Raises:
        CheckpointNotFoundError: not a checkpoint folder, an unknown tag or a missing rank file.
        CheckpointError: an unknown dtype or shard size, an unwritable ``output_dir``, or a
            checkpoint whose layout does not add up.
    """
    out_dtype = parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    tag_dir, tag_name = resolve_tag_dir(checkpoint_dir, tag)
    layout = read_layout(tag_dir, exclude_frozen=exclude_frozen)
    shards = plan_shards(layout.entries, out_dtype, shard_bytes)
    with _staging_dir(output_dir) as staging:
        _copy_weights(layout, shards, staging, progress=progress)
        _write_index(shards, layout.ties, staging)
        copy_pretrained_configs(tag_dir, staging, dtype=out_dtype)
        files = _publish(staging, output_dir)
    return ConsolidateResult(output_dir=os.fspath(output_dir), files=files,
                             total_size=sum(s.nbytes for s in shards),
                             num_tensors=len(layout.entries), ties=dict(layout.ties),
                             stage=layout.stage, world_size=layout.world_size, tag=tag_name)


def load_state_dict(output_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load what :func:`consolidate` (or :func:`save_final_weights`) wrote, ties restored.

    Args:
        output_dir: the folder holding ``model.safetensors`` or the shards and the index.

    Returns:
        The state dict, with every tied alias pointing at its stored tensor, so that
        ``model.load_state_dict(sd)`` works with ``strict=True``.

    Raises:
        CheckpointNotFoundError: no weights in ``output_dir``.
    """
    from safetensors import safe_open

    files, ties = _weight_files_and_ties(os.fspath(output_dir))
    state_dict: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            ties.update(_ties_from_metadata(f.metadata()))
            # In file order, which is the model's state-dict order (keys() would sort them).
            for name in getattr(f, "offset_keys", f.keys)():
                state_dict[name] = f.get_tensor(name)
    for alias, source in ties.items():
        if source in state_dict:
            state_dict[alias] = state_dict[source]
    return state_dict


def save_final_weights(engine, path: str | os.PathLike, *, dtype: str | torch.dtype = "fp32",
                       max_shard_size: int | str = "5GB", exclude_frozen: bool = False,
                       progress: bool = False) -> ConsolidateResult | None:
    """Write a live engine's weights to ``path`` as safetensors (the layout of :func:`consolidate`),
    with ``config.json`` and ``generation_config.json`` for a Hugging Face model, so that
    ``from_pretrained(path)`` loads it.

    Collective: every rank must call it, after the last ``engine.step()``. Parameters are
    taken from the fp32 master weights where the optimizer keeps them (ZeRO 1-3, and
    stage 0 in bf16/fp16), else from the module; under ZeRO-3 each parameter is gathered
    in turn, so no rank holds the whole model. Rank 0 writes; if it cannot create
    ``path`` it raises at once, while the other ranks would wait in the first gather.

    Args:
        engine: a ``DeepSpeedEngine`` (or a plain ``nn.Module`` in a single process).
        path: the output folder, e.g. ``os.path.join(output_dir, "final")``.
        dtype, max_shard_size, exclude_frozen, progress: as for :func:`consolidate`
            (``exclude_frozen``: only the trainable tensors, e.g. a LoRA run's adapters).

    Returns:
        The :class:`ConsolidateResult` on rank 0, None on the other ranks.
    """
    out_dtype = parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    module = getattr(engine, "module", engine)
    entries, ties, fetchers = _live_entries(engine, module, exclude_frozen=exclude_frozen)
    shards = plan_shards(entries, out_dtype, shard_bytes)
    if getattr(engine, "global_rank", runtime.rank()) != 0:
        for entry in entries:
            fetchers[entry.name]()  # collective: rank 0 makes the same calls in the same order
        return None
    with _staging_dir(path) as staging:
        writers = _open_shards(shards, ties, staging)
        try:
            with _progress(sum(s.nbytes for s in shards), progress) as bar:
                for entry in entries:
                    writers[entry.name].write(entry.name, 0, fetchers[entry.name]().reshape(-1))
                    bar.update(entry.numel * entry.out_dtype.itemsize)
        finally:
            for writer in set(writers.values()):
                writer.close()
        _write_index(shards, ties, staging)
        save_pretrained_configs(module, staging, dtype=out_dtype)
        files = _publish(staging, path)
    return ConsolidateResult(output_dir=os.fspath(path), files=files,
                             total_size=sum(s.nbytes for s in shards),
                             num_tensors=len(entries), ties=dict(ties), stage=_zero_stage(engine),
                             world_size=getattr(engine, "world_size", runtime.world_size()), tag="")


# --- arguments ------------------------------------------------------------------------------


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype for "fp32"/"bf16"/"fp16" (or their long names, or a torch dtype).

    Raises:
        CheckpointError: any other value.
    """
    if isinstance(dtype, torch.dtype) and dtype in set(OUTPUT_DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in OUTPUT_DTYPES:
        return OUTPUT_DTYPES[dtype.lower().removeprefix("torch.")]
    raise CheckpointError(f"dtype: unknown output dtype {dtype!r}; use fp32, bf16 or fp16")


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string like "5GB" (10^9), "500MB", "2GiB" (2^30).

    Raises:
        CheckpointError: not a positive size.
    """
    try:
        value = parse_bytes(size)
    except ValueError as e:
        raise CheckpointError(f"max_shard_size: {e}") from None
    if value < 1:
        raise CheckpointError(f"max_shard_size: must be at least 1 byte, got {size!r}")
    return value


def resolve_tag_dir(checkpoint_dir: str | os.PathLike, tag: str | None) -> tuple[str, str]:
    """The tag folder to read and its name.

    ``checkpoint_dir`` may be the folder given to ``save_checkpoint`` (the tag then comes
    from ``tag`` or the ``latest`` file) or a tag folder itself.

    Raises:
        CheckpointNotFoundError: the folder, the tag or ``latest`` is missing.
    """
    root = os.fspath(checkpoint_dir)
    if not os.path.isdir(root):
        raise CheckpointNotFoundError(f"checkpoint folder {root!r} does not exist (or is not a folder); pass "
                                      "the folder given to engine.save_checkpoint()")
    if tag is None and _has_model_states(root):
        return root, os.path.basename(os.path.normpath(root))
    if tag is None:
        latest = os.path.join(root, "latest")
        if not os.path.isfile(latest):
            raise CheckpointNotFoundError(
                f"{root!r} is not a DeepSpeed checkpoint folder: it has no 'latest' file and no "
                f"*_model_states.pt files (tags found: {_list_tags(root) or 'none'}); pass the folder given "
                "to engine.save_checkpoint(), a tag folder inside it, or tag=...")
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
    tag_dir = os.path.join(root, tag)
    if not _has_model_states(tag_dir):
        tags = _list_tags(root) or "none"
        raise CheckpointNotFoundError(f"tag {tag!r} does not exist in {root!r} "
                                      f"(no {tag_dir}/*_model_states.pt); tags found: {tags}")
    return tag_dir, tag


def _has_model_states(folder: str) -> bool:
    return bool(glob.glob(os.path.join(glob.escape(folder), "*_model_states.pt")))


def _list_tags(root: str) -> list[str]:
    return sorted(name for name in os.listdir(root) if _has_model_states(os.path.join(root, name)))


# --- step 1: the layout ---------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """A run of a weight's elements that sits contiguously in one source tensor.

    Attributes:
        file: the ``.pt`` file holding the source tensor.
        keys: the path to the tensor inside the loaded file, e.g.
            ``("optimizer_state_dict", "fp32_flat_groups", 0)``.
        src_offset: first element in the (flattened) source tensor.
        dst_offset: first element in the (flattened) output tensor.
        numel: elements in the run.
    """

    file: str
    keys: tuple
    src_offset: int
    dst_offset: int
    numel: int


@dataclass
class Entry:
    """One tensor to write: its name, shape, dtypes and where its elements come from."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # of the source
    pieces: list[Piece] = field(default_factory=list)
    out_dtype: torch.dtype | None = None  # set by plan_shards

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Layout:
    """Where every stored weight of a checkpoint lives, plus the ties between names."""

    entries: list[Entry]
    ties: dict[str, str]
    stage: int
    world_size: int


@dataclass(frozen=True)
class _Segment:
    """A flat source tensor holding elements [start, start + numel) of a longer vector."""

    file: str
    keys: tuple
    start: int
    numel: int


def read_layout(tag_dir: str, exclude_frozen: bool = False) -> Layout:
    """Map every weight of the checkpoint in ``tag_dir`` to the pieces holding its values.

    Only pickles are read (tensors stay mapped, untouched).

    Raises:
        CheckpointNotFoundError: a rank file is missing.
        CheckpointError: the checkpoint's numbers do not add up.
    """
    model_file = _model_file(tag_dir)
    meta = _load(model_file)
    module = meta["module"]
    optim_files = _optim_files(tag_dir, meta.get("dp_world_size"), zero=meta.get("param_shapes") is not None)
    world_size = len(optim_files) or int(meta.get("dp_world_size") or 1)
    ties = _find_ties(module, meta.get("shared_params"))
    buffers = set(meta.get("buffer_names") or ())
    frozen = dict(meta.get("frozen_param_shapes") or {})

    if not optim_files:  # ZeRO stage 0: the module (or FP16_Optimizer's flat fp32 groups)
        stage, sources = 0, _stage0_sources(meta, model_file, ties, buffers)
    else:
        stage = int(_load(optim_files[0])[OPTIMIZER_STATE]["zero_stage"])
        if stage == 3:
            model_files = [os.path.join(tag_dir, ZERO3_MODEL_FILE.format(rank=r)) for r in range(world_size)]
            _require_rank_files(model_files, world_size, tag_dir)
            sources = _zero3_param_sources(meta["param_shapes"], optim_files)
            sources.update(_zero3_frozen_sources(frozen, model_files))
        else:
            sources = _zero12_param_sources(meta["param_shapes"], optim_files)
            sources.update({name: [Piece(model_file, ("frozen_param_fragments", name), 0, 0,
                                         math.prod(shape))] for name, shape in frozen.items()})
    for name in buffers:
        if name in module:
            sources[name] = [Piece(model_file, ("module", name), 0, 0, module[name].numel())]

    entries = _entries_in_module_order(module, sources, ties, frozen if exclude_frozen else {}, meta)
    stored = {e.name for e in entries}
    ties = {alias: source for alias, source in ties.items() if source in stored}
    return Layout(entries=entries, ties=ties, stage=stage, world_size=world_size)


def _load(path: str) -> Any:
    """A ``.pt`` file with its tensors memory-mapped (read only when touched)."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def _model_file(tag_dir: str) -> str:
    for name in (MODEL_FILE, ZERO3_MODEL_FILE.format(rank=0)):
        if os.path.isfile(os.path.join(tag_dir, name)):
            return os.path.join(tag_dir, name)
    pattern = os.path.join(glob.escape(tag_dir), "*_model_states.pt")
    found = sorted(os.path.basename(p) for p in glob.glob(pattern))
    raise CheckpointNotFoundError(f"{tag_dir!r} has neither {MODEL_FILE} nor "
                                  f"{ZERO3_MODEL_FILE.format(rank=0)} "
                                  f"(found: {found or 'none'}); rank 0's file is missing, or the checkpoint "
                                  "uses tensor/pipeline parallelism, which is not supported")


def _optim_files(tag_dir: str, world_size: int | None, zero: bool) -> list[str]:
    """Each rank's ``*_optim_states.pt``, in rank order; [] for a stage-0 checkpoint.

    Args:
        world_size: the ranks that wrote the checkpoint (``dp_world_size`` of the model
            states; None in old checkpoints: then the highest rank file found says).
    """
    by_rank = {}
    for path in os.listdir(tag_dir):
        match = OPTIM_FILE_RE.match(path)
        if match:
            by_rank[int(match.group(1))] = os.path.join(tag_dir, path)
    if not by_rank and not zero:
        return []
    world_size = int(world_size or max(by_rank, default=0) + 1)
    if by_rank and max(by_rank) >= world_size:
        raise CheckpointError(f"{tag_dir!r} holds optimizer files of ranks up to {max(by_rank)}, but the "
                              f"checkpoint was written by {world_size} ranks: files of an older, larger run "
                              "were left in this tag folder; remove them or use another tag")
    prefix = "bf16_" if any(os.path.basename(p).startswith("bf16_") for p in by_rank.values()) else ""
    expected = [by_rank.get(r, os.path.join(tag_dir, f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
                for r in range(world_size)]
    _require_rank_files(expected, world_size, tag_dir)
    return expected


def _require_rank_files(paths: list[str], world_size: int, tag_dir: str) -> None:
    missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise CheckpointNotFoundError(
            f"{tag_dir!r} is missing {len(missing)} of {world_size} rank files: {', '.join(missing)} "
            f"(the checkpoint was written by {world_size} ranks and each writes one). A rank did not "
            "finish saving, or its files are on another machine: copy them here, or use another tag")


def _find_ties(module: dict, shared_params: dict | None) -> dict[str, str]:
    """``{alias: stored name}`` for state-dict keys that are the same tensor as an earlier key.

    DeepSpeed lists ties in ``shared_params`` at stages 1-3 (rank 0's file) but not at stage
    0; there, as at every stage, the saved module dict keeps tied keys as tensors sharing
    storage, offset, shape and stride.
    """
    ties, first_name = {}, {}
    for name, tensor in module.items():
        if not isinstance(tensor, torch.Tensor):  # a module's extra state
            continue
        # The storage's own address (_cdata), not data_ptr(): ZeRO-3 saves every param as an
        # empty tensor, and empty storages may all report data_ptr() 0.
        key = (tensor.untyped_storage()._cdata, tensor.storage_offset(), tuple(tensor.shape),
               tensor.stride(), tensor.dtype)
        if key in first_name:
            ties[name] = first_name[key]
        else:
            first_name[key] = name
    for alias, source in (shared_params or {}).items():
        ties.setdefault(alias, ties.get(source, source))
    return ties


def _split(segments: list[_Segment], start: int, numel: int, dst_offset: int = 0) -> list[Piece]:
    """The pieces holding elements [start, start + numel) of the vector ``segments`` make up."""
    pieces = []
    for seg in segments:
        lo, hi = max(start, seg.start), min(start + numel, seg.start + seg.numel)
        if lo < hi:
            pieces.append(Piece(seg.file, seg.keys, lo - seg.start, dst_offset + lo - start, hi - lo))
    if sum(p.numel for p in pieces) != numel:
        raise CheckpointError(f"the flat fp32 groups hold {sum(s.numel for s in segments)} elements, too few "
                              f"for elements {start}..{start + numel}: the rank files do not belong together")
    return pieces


def _consecutive(file_keys_numels: Iterable[tuple[str, tuple, int]]) -> list[_Segment]:
    """Segments laid end to end."""
    segments, start = [], 0
    for file, keys, numel in file_keys_numels:
        segments.append(_Segment(file, keys, start, numel))
        start += numel
    return segments


def _zero12_param_sources(param_shapes: list[dict], optim_files: list[str]) -> dict[str, list[Piece]]:
    """ZeRO 1-2: group g is the rank partitions ``single_partition_of_fp32_groups[g]`` end to
    end; its params follow ``param_shapes[g]``, each followed by its alignment padding."""
    states = [_load(path)[OPTIMIZER_STATE] for path in optim_files]
    paddings = states[0].get("param_alignment_paddings")
    world_size = len(optim_files)
    sources = {}
    for g, shapes in enumerate(param_shapes):
        keys = (OPTIMIZER_STATE, ZERO12_FP32_GROUPS, g)
        segments = _consecutive((path, keys, state[ZERO12_FP32_GROUPS][g].numel())
                                for path, state in zip(optim_files, states))
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            sources[name] = _split(segments, offset, numel)
            offset += numel + (paddings[g][i] if paddings else 0)
        # Groups are padded to a multiple of 2 * world_size elements (zero_to_fp32's check).
        available = segments[-1].start + segments[-1].numel
        if _round_up(offset, 2 * world_size) != _round_up(available, 2 * world_size):
            raise CheckpointError(f"group {g}: the parameters take {offset} elements but the rank files hold "
                                  f"{available}; the checkpoint is inconsistent")
    return sources


def _zero3_param_sources(param_shapes: list[dict], optim_files: list[str]) -> dict[str, list[Piece]]:
    """ZeRO-3: each param is split into ``world_size`` equal parts (the last padded); rank r
    holds part r at the same offset of its ``fp32_flat_groups`` laid end to end."""
    world_size = len(optim_files)
    rank_segments, totals = [], set()
    for path in optim_files:
        groups = _load(path)[OPTIMIZER_STATE][ZERO3_FP32_GROUPS]
        rank_segments.append(_consecutive((path, (OPTIMIZER_STATE, ZERO3_FP32_GROUPS, g), t.numel())
                                          for g, t in enumerate(groups)))
        totals.add(sum(t.numel() for t in groups))
    sources, offset = {}, 0
    for name, shape in ((n, s) for group in param_shapes for n, s in group.items()):
        numel = math.prod(shape)
        part = math.ceil(numel / world_size)
        sources[name] = [piece for r in range(world_size) if r * part < numel
                         for piece in _split(rank_segments[r], offset, min(part, numel - r * part), r * part)]
        offset += part
    if totals != {offset}:
        raise CheckpointError(f"the parameters take {offset} elements per rank but the rank files hold "
                              f"{sorted(totals)}; the checkpoint is inconsistent")
    return sources


def _zero3_frozen_sources(frozen: dict, model_files: list[str]) -> dict[str, list[Piece]]:
    """ZeRO-3 frozen params: rank r's model file holds part r in ``frozen_param_fragments``."""
    world_size = len(model_files)
    sources = {}
    for name, shape in frozen.items():
        numel = math.prod(shape)
        part = math.ceil(numel / world_size)
        sources[name] = [Piece(model_files[r], ("frozen_param_fragments", name), 0, r * part,
                               min(part, numel - r * part)) for r in range(world_size) if r * part < numel]
    return sources


def _stage0_sources(meta: dict, model_file: str, ties: dict, buffers: set) -> dict[str, list[Piece]]:
    """ZeRO-0: fp32 weights are the module's; bf16/fp16 training keeps fp32 masters in
    FP16_Optimizer's ``fp32_groups_flat``, the trainable params flattened in module order."""
    module = meta["module"]
    params = [name for name in module if name not in ties and name not in buffers]
    flat = (meta.get("optimizer") or {}).get("fp32_groups_flat")
    if not flat or all(module[name].dtype == torch.float32 for name in params):
        return {name: [Piece(model_file, ("module", name), 0, 0, module[name].numel())] for name in params}
    segments = _consecutive((model_file, ("optimizer", "fp32_groups_flat", g), t.numel())
                            for g, t in enumerate(flat))
    available = sum(t.numel() for t in flat)
    needed = sum(module[name].numel() for name in params)
    if needed != available:
        raise CheckpointError(f"{model_file}: the module's {len(params)} parameters take {needed} elements "
                              f"but the fp32 master groups hold {available}; only optimizers built from "
                              "model.parameters() in order can be mapped at stage 0")
    sources, offset = {}, 0
    for name in params:
        sources[name] = _split(segments, offset, module[name].numel())
        offset += module[name].numel()
    return sources


def _entries_in_module_order(module: dict, sources: dict, ties: dict, excluded: dict,
                             meta: dict) -> list[Entry]:
    """One entry per stored state-dict key, in the model's ``state_dict()`` order."""
    shapes = {name: tuple(shape) for group in (meta.get("param_shapes") or [])
              for name, shape in group.items()}
    shapes.update({name: tuple(shape) for name, shape in (meta.get("frozen_param_shapes") or {}).items()})
    entries = []
    for name, tensor in module.items():
        if name in ties or name in excluded:
            continue
        if name not in sources:
            log.warning("consolidate: %s is in the module but in no parameter group, frozen set or buffer "
                        "list of the checkpoint; it is left out", name)
            continue
        from_master = sources[name][0].keys[0] in ("optimizer", OPTIMIZER_STATE)
        entries.append(Entry(name=name, shape=shapes.get(name, tuple(tensor.shape)), pieces=sources[name],
                             dtype=torch.float32 if from_master else tensor.dtype))
    for entry in entries:
        covered = sum(p.numel for p in entry.pieces)
        if covered != entry.numel:
            raise CheckpointError(f"{entry.name}: found {covered} of its {entry.numel} elements in the "
                                  "checkpoint; the checkpoint is inconsistent")
    return entries


def _round_up(value: int, multiple: int) -> int:
    return multiple * math.ceil(value / multiple)


# --- step 2: the shards -------------------------------------------------------------------


@dataclass
class Shard:
    """One output file: its name, its entries and their byte offsets in its data section."""

    name: str
    entries: list[Entry]
    nbytes: int


def plan_shards(entries: list[Entry], out_dtype: torch.dtype, max_bytes: int) -> list[Shard]:
    """Split ``entries`` in order into shards of at most ``max_bytes`` (a bigger tensor alone).

    Floating-point entries are written as ``out_dtype``; others keep their dtype.
    """
    groups: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        entry.out_dtype = out_dtype if entry.dtype.is_floating_point else entry.dtype
        nbytes = entry.numel * entry.out_dtype.itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += nbytes
    if len(groups) == 1:
        names = [WEIGHTS_NAME]
    else:
        names = [SHARD_NAME.format(index=i + 1, count=len(groups)) for i in range(len(groups))]
    return [Shard(name, group, sum(e.numel * e.out_dtype.itemsize for e in group))
            for name, group in zip(names, groups)]


# --- step 3: the copy ---------------------------------------------------------------------


class SafetensorsWriter:
    """Writes one safetensors file whose header is known up front, tensors in any order.

    The header (shapes, dtypes, offsets, metadata) goes first; :meth:`write` then puts
    elements straight at their place with ``pwrite``, so nothing is buffered.
    """

    def __init__(self, path: str, entries: list[Entry], metadata: dict[str, str]):
        header: dict[str, Any] = {"__metadata__": metadata}
        self.offsets: dict[str, int] = {}
        offset = 0
        for entry in entries:
            nbytes = entry.numel * entry.out_dtype.itemsize
            header[entry.name] = {"dtype": SAFETENSORS_DTYPES[entry.out_dtype], "shape": list(entry.shape),
                                  "data_offsets": [offset, offset + nbytes]}
            self.offsets[entry.name] = offset
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
        self.data_start = 8 + len(raw)
        self.dtypes = {entry.name: entry.out_dtype for entry in entries}
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, len(raw).to_bytes(8, "little") + raw, 0)
        os.ftruncate(self.fd, self.data_start + offset)

    def write(self, name: str, element_offset: int, values: torch.Tensor) -> None:
        """Write the flat ``values`` (converted to the entry's dtype) from ``element_offset`` on."""
        dtype = self.dtypes[name]
        data = values.to(dtype).contiguous().view(torch.uint8).numpy()
        os.pwrite(self.fd, data, self.data_start + self.offsets[name] + element_offset * dtype.itemsize)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open_shards(shards: list[Shard], ties: dict[str, str], folder: str) -> dict[str, SafetensorsWriter]:
    """One writer per shard, keyed by each entry name it holds."""
    metadata = {"format": "pt", TIES_KEY: json.dumps(ties, sort_keys=True)}
    writers = {}
    for shard in shards:
        writer = SafetensorsWriter(os.path.join(folder, shard.name), shard.entries, metadata)
        writers.update({entry.name: writer for entry in shard.entries})
    return writers


def _copy_weights(layout: Layout, shards: list[Shard], folder: str, progress: bool) -> None:
    """Copy every piece to its shard, one source file at a time (one file mapped at once)."""
    writers = _open_shards(shards, layout.ties, folder)
    by_file: dict[str, list[tuple[Entry, Piece]]] = defaultdict(list)
    for entry in layout.entries:
        for piece in entry.pieces:
            by_file[piece.file].append((entry, piece))
    try:
        with _progress(sum(s.nbytes for s in shards), progress) as bar:
            for path, work in by_file.items():
                state = _load(path)
                for entry, piece in work:
                    source = _lookup(state, piece.keys).reshape(-1)
                    for start, chunk in _chunks(source, piece.src_offset, piece.numel):
                        writers[entry.name].write(entry.name, piece.dst_offset + start, chunk)
                        _drop_pages(chunk)
                        bar.update(chunk.numel() * entry.out_dtype.itemsize)
                del state  # unmaps the file
    finally:
        for writer in set(writers.values()):
            writer.close()


def _lookup(state: Any, keys: tuple) -> torch.Tensor:
    for key in keys:
        state = state[key]
    return state


def _chunks(source: torch.Tensor, offset: int, numel: int) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, numel, CHUNK_NUMEL):
        yield start, source.narrow(0, offset + start, min(CHUNK_NUMEL, numel - start))


_LIBC = None


def _drop_pages(chunk: torch.Tensor) -> None:
    """Tell the kernel the mapped pages under ``chunk`` are no longer needed.

    The source files are mapped read-only-in-practice (``torch.load(mmap=True)``): clean
    file pages, which the kernel re-reads from the file if touched again. Dropping them
    keeps the resident set at one chunk instead of a whole rank partition.
    """
    global _LIBC
    if not sys.platform.startswith("linux"):  # elsewhere the pages just age out of the cache
        return
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = chunk.data_ptr()
    end = start + chunk.numel() * chunk.element_size()
    first, last = _round_up(start, page), (end // page) * page  # whole pages inside the chunk only
    if last > first:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


@contextlib.contextmanager
def _progress(total_bytes: int, enabled: bool):
    from tqdm import tqdm

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="consolidate",
               disable=not enabled, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def _write_index(shards: list[Shard], ties: dict[str, str], folder: str) -> None:
    """``model.safetensors.index.json`` for sharded output (Hugging Face's format)."""
    if len(shards) == 1:
        return
    index = {"metadata": {"total_size": sum(s.nbytes for s in shards), TIES_KEY: dict(sorted(ties.items()))},
             "weight_map": {entry.name: shard.name for shard in shards for entry in shard.entries}}
    with open(os.path.join(folder, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


# --- the output folder ------------------------------------------------------------------------


@contextlib.contextmanager
def _staging_dir(output_dir: str | os.PathLike) -> Iterator[str]:
    """A fresh folder next to ``output_dir`` (same file system, so moves are renames);
    removed on exit, whatever happens."""
    output_dir = os.path.abspath(os.fspath(output_dir))
    parent = os.path.dirname(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise CheckpointError(f"output folder {output_dir!r} is an existing file; pass a folder path")
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.partial-", dir=parent)
    except OSError as e:
        raise CheckpointError(f"cannot write the output folder {output_dir!r}: {e.strerror} ({parent!r}); "
                              "choose a folder you can write to, or fix its permissions") from None
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: str, output_dir: str | os.PathLike) -> list[str]:
    """Move the finished files into ``output_dir``, replacing earlier weight files there.

    A reader, or a crash at any moment, finds the earlier complete set or the new one, never
    a mix: every file is flushed to disk first; a single file replaces the earlier one
    atomically (the earlier index, which readers prefer, goes only after); new shards go in
    only once the earlier index is gone (they may reuse its shards' names), their index last.
    Replacing one sharded set by another leaves a moment with no index: nothing loads, and
    the next run writes it again.

    Returns:
        The safetensors file names, in order.
    """
    from .saving import fsync_path

    output_dir = os.path.abspath(os.fspath(output_dir))
    names = sorted(os.listdir(staging))
    sharded = INDEX_NAME in names
    try:
        os.makedirs(output_dir, exist_ok=True)
        earlier = set(_weight_file_names(output_dir))
        for name in names:
            fsync_path(os.path.join(staging, name))
        if sharded and INDEX_NAME in earlier:
            os.remove(os.path.join(output_dir, INDEX_NAME))
        for name in sorted(names, key=lambda n: n == INDEX_NAME):  # the index last
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
        for stale in sorted(earlier - set(names), key=lambda n: n != INDEX_NAME):  # an earlier index first
            os.remove(os.path.join(output_dir, stale))
        fsync_path(output_dir)
    except OSError as e:
        raise CheckpointError(f"cannot write the output folder {output_dir!r}: {e}; choose a folder you can "
                              "write to, or fix its permissions") from None
    return [name for name in names if name.endswith(".safetensors")]


def _weight_file_names(folder: str) -> list[str]:
    return [name for name in os.listdir(folder)
            if name in (WEIGHTS_NAME, INDEX_NAME) or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name)]


def _weight_files_and_ties(folder: str) -> tuple[list[str], dict[str, str]]:
    index_path = os.path.join(folder, INDEX_NAME)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        files = sorted(set(index["weight_map"].values()))
        return [os.path.join(folder, name) for name in files], dict(index["metadata"].get(TIES_KEY, {}))
    single = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(single):
        return [single], {}
    raise CheckpointNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {folder!r}; write it with "
                                  "zeroloop.consolidate() or `zeroloop consolidate`")


def _ties_from_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    return json.loads((metadata or {}).get(TIES_KEY, "{}"))


# --- a live engine (save_final_weights) -------------------------------------------------------


def _live_entries(engine, module: torch.nn.Module, exclude_frozen: bool = False):
    """Entries for the module's state dict, ties, and a fetcher per stored name.

    Fetchers return the full fp32 value on every rank (collective where DeepSpeed's
    helpers are), the ZeRO-3 gathering included. ``exclude_frozen`` leaves out parameters
    without ``requires_grad`` (buffers stay, as in :func:`consolidate`).
    """
    params = dict(module.named_parameters(remove_duplicate=False))
    buffers = dict(module.named_buffers(remove_duplicate=False))
    entries, ties, fetchers, first_name = [], {}, {}, {}
    masters = _stage0_masters(engine)
    for name in module.state_dict(keep_vars=True):  # persistent buffers only, like state_dict()
        tensor = params.get(name, buffers.get(name))
        if tensor is None:  # an extra state entry: not a tensor of the module
            continue
        is_param = name in params
        if exclude_frozen and is_param and not tensor.requires_grad:
            continue  # its tied aliases too: they are the same frozen tensor
        if id(tensor) in first_name:
            ties[name] = first_name[id(tensor)]
            continue
        first_name[id(tensor)] = name
        shape = tuple(getattr(tensor, "ds_shape", tensor.shape))
        dtype = torch.float32 if is_param and tensor.is_floating_point() else tensor.dtype
        entries.append(Entry(name=name, shape=shape, dtype=dtype))
        fetchers[name] = _fetcher(tensor, is_param, masters)
    return entries, ties, fetchers


def _fetcher(tensor: torch.Tensor, is_param: bool, masters: dict[int, torch.Tensor]):
    def fetch() -> torch.Tensor:
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        if is_param and (id(tensor) in masters):
            return masters[id(tensor)].detach().cpu()
        has_master = getattr(tensor, "_z3_optimizer", None) is not None or hasattr(tensor, "_hp_mapping")
        if is_param and tensor.requires_grad and has_master:  # not so for an engine without optimizer
            value = safe_get_full_fp32_param(tensor)
            if value is not None:
                return value.detach().cpu()
        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None,
                                               enabled=hasattr(tensor, "ds_id")):
            value = tensor.detach().cpu().clone()
        return value.float() if is_param and value.is_floating_point() else value

    return fetch


def _stage0_masters(engine) -> dict[int, torch.Tensor]:
    """``{id(param): fp32 master}`` for FP16_Optimizer (ZeRO-0 with bf16/fp16)."""
    optimizer = getattr(engine, "optimizer", None)
    groups, flats = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups_flat", None)
    if not groups or not flats:
        return {}
    masters = {}
    for params, flat in zip(groups, flats):
        offset = 0
        for p in params:
            masters[id(p)] = flat.narrow(0, offset, p.numel()).view(p.shape)
            offset += p.numel()
    return masters


def _zero_stage(engine) -> int:
    stage = getattr(engine, "zero_optimization_stage", None)
    return int(stage()) if callable(stage) else 0
