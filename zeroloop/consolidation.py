"""Turn a DeepSpeed checkpoint (ZeRO stage 0-3, fp32/bf16/fp16, any world size) into
Hugging Face-layout safetensors weights, streaming.

Read :func:`consolidate` top to bottom. It works in three steps:

1. **Layout**: from the checkpoint's small pickles, find where every element of every
   weight lives: which rank file, which flat fp32 group, at which offset
   (:func:`zeroloop.zero_layout.read_layout`).
2. **Plan**: split the weights into output shards of at most ``max_shard_size`` bytes
   and write each shard's safetensors header up front, every shape being known
   (:mod:`zeroloop.safetensors_io`).
3. **Copy**: visit the source files one at a time and ``pwrite`` each piece of each
   weight to its place in its shard, converted to the output dtype in bounded chunks.
   Pages of the mapped source are dropped once copied, so the peak memory is one chunk
   (``CHUNK_NUMEL`` elements) on top of the interpreter: it does not grow with the model.

Everything is written into a temporary folder next to ``output_dir`` and moved into
place at the end; a failed run leaves no output that looks complete. A live engine's
weights are written in the same layout by :func:`zeroloop.export.save_final_weights`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

import torch

from .pretrained import copy_pretrained_configs
from .safetensors_io import (Shard, parse_dtype, parse_shard_size, plan_shards, publish, shard_writers,
                             staging_dir, write_index)
from .zero_layout import (Entry, Layout, Piece, chunks, drop_pages, load_mapped, lookup, read_layout,
                          resolve_tag_dir)


@dataclass(frozen=True)
class ConsolidateResult:
    """What :func:`consolidate` (or :func:`zeroloop.export.save_final_weights`) wrote.

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
    shard_bytes = parse_shard_size(max_shard_size)
    tag_dir, tag_name = resolve_tag_dir(checkpoint_dir, tag)
    layout = read_layout(tag_dir, exclude_frozen=exclude_frozen)
    shards = plan_shards(layout.entries, out_dtype, shard_bytes)
    with staging_dir(output_dir) as staging:
        _copy_weights(layout, shards, staging, progress=progress)
        write_index(shards, layout.ties, staging)
        copy_pretrained_configs(tag_dir, staging, dtype=out_dtype)
        files = publish(staging, output_dir)
    return ConsolidateResult(output_dir=os.fspath(output_dir), files=files,
                             total_size=sum(s.nbytes for s in shards),
                             num_tensors=len(layout.entries), ties=dict(layout.ties),
                             stage=layout.stage, world_size=layout.world_size, tag=tag_name)


def _copy_weights(layout: Layout, shards: list[Shard], folder: str, progress: bool) -> None:
    """Copy every piece to its shard, one source file at a time (one file mapped at once)."""
    by_file: dict[str, list[tuple[Entry, Piece]]] = defaultdict(list)
    for entry in layout.entries:
        for piece in entry.pieces:
            by_file[piece.file].append((entry, piece))
    with shard_writers(shards, layout.ties, folder, progress) as (writers, bar):
        for path, work in by_file.items():
            state = load_mapped(path)
            for entry, piece in work:
                source = lookup(state, piece.keys).reshape(-1)
                for start, chunk in chunks(source, piece.src_offset, piece.numel):
                    writers[entry.name].write(entry.name, piece.dst_offset + start, chunk)
                    drop_pages(chunk)
                    bar.update(chunk.numel() * entry.out_dtype.itemsize)
            del state  # unmaps the file
