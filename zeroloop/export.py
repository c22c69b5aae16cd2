"""The final weights of a live engine as safetensors: :func:`save_final_weights`.

The output has the layout :func:`zeroloop.consolidate` writes from a checkpoint (one file
or shards with an index, ties in the metadata), read back with
:func:`zeroloop.safetensors_io.load_state_dict`.
"""

from __future__ import annotations

import os

import torch

from . import runtime
from .consolidation import ConsolidateResult
from .pretrained import save_pretrained_configs
from .safetensors_io import (parse_dtype, parse_shard_size, plan_shards, publish, shard_writers, staging_dir,
                             write_index)
from .zero_layout import Entry


def save_final_weights(engine, path: str | os.PathLike, *, dtype: str | torch.dtype = "fp32",
                       max_shard_size: int | str = "5GB", exclude_frozen: bool = False,
                       progress: bool = False) -> ConsolidateResult | None:
    """Write a live engine's weights to ``path`` as safetensors (the layout of
    :func:`zeroloop.consolidate`),
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
        dtype, max_shard_size, exclude_frozen, progress: as for :func:`zeroloop.consolidate`
            (``exclude_frozen``: only the trainable tensors, e.g. a LoRA run's adapters).

    Returns:
        The :class:`ConsolidateResult` on rank 0, None on the other ranks.
    """
    out_dtype = parse_dtype(dtype)
    shard_bytes = parse_shard_size(max_shard_size)
    module = getattr(engine, "module", engine)
    entries, ties, fetchers = _live_entries(engine, module, exclude_frozen=exclude_frozen)
    shards = plan_shards(entries, out_dtype, shard_bytes)
    if getattr(engine, "global_rank", runtime.rank()) != 0:
        for entry in entries:
            fetchers[entry.name]()  # collective: rank 0 makes the same calls in the same order
        return None
    with staging_dir(path) as staging:
        with shard_writers(shards, ties, staging, progress) as (writers, bar):
            for entry in entries:
                writers[entry.name].write(entry.name, 0, fetchers[entry.name]().reshape(-1))
                bar.update(entry.numel * entry.out_dtype.itemsize)
        write_index(shards, ties, staging)
        save_pretrained_configs(module, staging, dtype=out_dtype)
        files = publish(staging, path)
    # DeepSpeed's engine knows its stage; a plain module is trained without ZeRO.
    stage = int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else 0
    return ConsolidateResult(output_dir=os.fspath(path), files=files,
                             total_size=sum(s.nbytes for s in shards),
                             num_tensors=len(entries), ties=dict(ties), stage=stage,
                             world_size=getattr(engine, "world_size", runtime.world_size()), tag="")


def _live_entries(engine, module: torch.nn.Module, exclude_frozen: bool = False):
    """Entries for the module's state dict, ties, and a fetcher per stored name.

    Fetchers return the full fp32 value on every rank (collective where DeepSpeed's
    helpers are), the ZeRO-3 gathering included. ``exclude_frozen`` leaves out parameters
    without ``requires_grad`` (buffers stay, as in :func:`zeroloop.consolidate`).
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
