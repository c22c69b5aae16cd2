"""Safetensors in Hugging Face's layout, streaming: shards, their index, and reading them back.

:func:`plan_shards` splits the tensors into files of at most ``max_shard_size`` bytes;
:class:`SafetensorsWriter` writes each file's header up front (every shape is known) and
then puts elements straight at their place with ``pwrite``, in any order, so nothing is
buffered. Files are written into a staging folder (:func:`staging_dir`) and moved into
place at the end (:func:`publish`); a failed run leaves no output that looks complete.

Tied weights (``lm_head.weight`` sharing ``wte.weight``) are stored once; the ties go in
each file's safetensors metadata and in the index under ``metadata.tied_weights``.
:func:`load_state_dict` restores every key, so ``model.load_state_dict(sd)`` works strict.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .errors import CheckpointError, CheckpointNotFoundError
from .metrics import ProgressBar
from .sizes import parse_size
from .zero_layout import Entry

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
TIES_KEY = "tied_weights"  # safetensors metadata / index metadata key: JSON {alias: stored name}

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


def parse_shard_size(size: int | str) -> int:
    """Bytes in ``max_shard_size``: an int, or a string like "5GB" (10^9), "500MB", "2GiB" (2^30).

    Raises:
        CheckpointError: not a positive size.
    """
    try:
        value = parse_size(size)
    except ValueError as e:
        raise CheckpointError(f"max_shard_size: {e}") from None
    if value < 1:
        raise CheckpointError(f"max_shard_size: must be at least 1 byte, got {size!r}")
    return value


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


def open_shards(shards: list[Shard], ties: dict[str, str], folder: str) -> dict[str, SafetensorsWriter]:
    """One writer per shard, keyed by each entry name it holds (close each when done)."""
    metadata = {"format": "pt", TIES_KEY: json.dumps(ties, sort_keys=True)}
    writers = {}
    for shard in shards:
        writer = SafetensorsWriter(os.path.join(folder, shard.name), shard.entries, metadata)
        writers.update({entry.name: writer for entry in shard.entries})
    return writers


@contextlib.contextmanager
def shard_writers(shards: list[Shard], ties: dict[str, str], folder: str,
                  progress: bool) -> Iterator[tuple[dict[str, SafetensorsWriter], ProgressBar]]:
    """``(writers, bar)``: :func:`open_shards`' writers and a progress bar over the bytes of
    ``shards`` (shown when ``progress``); every writer is closed on exit, whatever happens."""
    writers = open_shards(shards, ties, folder)
    try:
        total = sum(s.nbytes for s in shards)
        with ProgressBar.over_bytes(total, desc="consolidate", enabled=progress) as bar:
            yield writers, bar
    finally:
        for writer in set(writers.values()):
            writer.close()


def write_index(shards: list[Shard], ties: dict[str, str], folder: str) -> None:
    """``model.safetensors.index.json`` for sharded output (Hugging Face's format)."""
    if len(shards) == 1:
        return
    index = {"metadata": {"total_size": sum(s.nbytes for s in shards), TIES_KEY: dict(sorted(ties.items()))},
             "weight_map": {entry.name: shard.name for shard in shards for entry in shard.entries}}
    with open(os.path.join(folder, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


@contextlib.contextmanager
def staging_dir(output_dir: str | os.PathLike) -> Iterator[str]:
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


def publish(staging: str, output_dir: str | os.PathLike) -> list[str]:
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


def load_state_dict(output_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load what :func:`zeroloop.consolidate` (or :func:`zeroloop.export.save_final_weights`)
    wrote, ties restored.

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
