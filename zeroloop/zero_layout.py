"""The reader of DeepSpeed's checkpoint layout: where every element of every weight lives.

From a checkpoint's small pickles (loaded with ``mmap=True``, so no tensor data is read),
:func:`read_layout` finds, for every weight of a ZeRO stage 0-3 checkpoint of any world
size and precision, which rank file, which flat fp32 group and which offset hold its
elements (:class:`Piece`). DeepSpeed's own ``deepspeed/utils/zero_to_fp32.py`` documents
the formats this follows. :mod:`zeroloop.consolidation` and :mod:`zeroloop.universal`
read the pieces with :func:`chunks`, dropping each chunk's pages once copied
(:func:`drop_pages`), so the memory they use does not grow with the model.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import math
import mmap
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from .errors import CheckpointError, CheckpointNotFoundError
from .manifest import read_latest

log = logging.getLogger("zeroloop")

# Keys of DeepSpeed's checkpoint dicts (deepspeed.checkpoint.constants).
OPTIMIZER_STATE = "optimizer_state_dict"
ZERO12_FP32_GROUPS = "single_partition_of_fp32_groups"
ZERO3_FP32_GROUPS = "fp32_flat_groups"

MODEL_FILE = "mp_rank_00_model_states.pt"
ZERO3_MODEL_FILE = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
OPTIM_FILE_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
# Elements converted per copy (16 Mi = 64 MiB of fp32): bounds the working memory.
CHUNK_NUMEL = 16 * 1024 * 1024


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
        tag = read_latest(root)
        if tag is None:
            raise CheckpointNotFoundError(
                f"{root!r} is not a DeepSpeed checkpoint folder: it has no readable 'latest' file and no "
                f"*_model_states.pt files (tags found: {_list_tags(root) or 'none'}); pass the folder given "
                "to engine.save_checkpoint(), a tag folder inside it, or tag=...")
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
    model_file = find_model_file(tag_dir)
    meta = load_mapped(model_file)
    module = meta["module"]
    optim_files = _optim_files(tag_dir, meta.get("dp_world_size"), zero=meta.get("param_shapes") is not None)
    world_size = len(optim_files) or int(meta.get("dp_world_size") or 1)
    ties = _find_ties(module, meta.get("shared_params"))
    buffers = set(meta.get("buffer_names") or ())
    frozen = dict(meta.get("frozen_param_shapes") or {})

    if not optim_files:  # ZeRO stage 0: the module (or FP16_Optimizer's flat fp32 groups)
        stage, sources = 0, _stage0_sources(meta, model_file, ties, buffers)
    else:
        stage = int(load_mapped(optim_files[0])[OPTIMIZER_STATE]["zero_stage"])
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


def load_mapped(path: str) -> Any:
    """A ``.pt`` file with its tensors memory-mapped (read only when touched)."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def find_model_file(tag_dir: str) -> str:
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
    states = [load_mapped(path)[OPTIMIZER_STATE] for path in optim_files]
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
        groups = load_mapped(path)[OPTIMIZER_STATE][ZERO3_FP32_GROUPS]
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


def lookup(state: Any, keys: tuple) -> torch.Tensor:
    """The tensor at ``keys`` (a :attr:`Piece.keys` path) inside a loaded file."""
    for key in keys:
        state = state[key]
    return state


def chunks(source: torch.Tensor, offset: int, numel: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, view)`` over elements [offset, offset + numel) of the flat ``source``, at most
    :data:`CHUNK_NUMEL` at a time (read when called, so a changed value applies)."""
    for start in range(0, numel, CHUNK_NUMEL):
        yield start, source.narrow(0, offset + start, min(CHUNK_NUMEL, numel - start))


_LIBC = None


def drop_pages(chunk: torch.Tensor) -> None:
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
