"""What a checkpoint folder holds, from its manifest: ``zeroloop inspect CHECKPOINT``.

Reads only JSON (the manifests) and file sizes, never a pickle, so it is safe on any
checkpoint; a universal checkpoint written by DeepSpeed's ``ds_to_universal`` has no
manifest and is described by its files alone.
"""

from __future__ import annotations

import os
from typing import Any

from .saving import folder_files
from .errors import CheckpointError
from .manifest import LATEST, MANIFEST, read_manifest
from .resume import saved_layout, saved_train_batch
from .universal import UNIVERSAL_MANIFEST, UNIVERSAL_SUFFIX, is_deepspeed_universal, read_universal_manifest


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Describe a tag folder, or every tag folder of a checkpoint folder.

    Args:
        path: a tag folder (``checkpoints/global_step8``), a folder holding ``latest``
            and tag folders, or a universal checkpoint.

    Returns:
        For a tag folder: ``path``, ``kind`` ("zeroloop", "universal conversion" or
        "deepspeed universal"), ``complete`` (with ``problem`` when not), ``files``
        (name -> bytes), ``bytes`` and, from a manifest, the step, position, layout and
        batch. For a checkpoint folder: ``latest`` and ``checkpoints``, one such
        description per tag folder, oldest step first.

    Raises:
        CheckpointError: ``path`` is not a folder.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a folder; pass a checkpoint's tag folder or the folder holding them")
    if _is_tag_folder(path):
        return describe_tag(path)
    latest = os.path.join(path, LATEST)
    tags = [describe_tag(os.path.join(path, name)) for name in sorted(os.listdir(path))
            if os.path.isdir(os.path.join(path, name))]
    tags.sort(key=lambda tag: (tag.get("global_step", float("inf")), tag["path"]))  # the others last
    named = None
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            named = f.read().strip()
    return {"path": path, "latest": named, "checkpoints": tags}


def _is_tag_folder(path: str) -> bool:
    names = os.listdir(path)
    return MANIFEST in names or UNIVERSAL_MANIFEST in names or any(n.endswith("_model_states.pt") for n in names)


def describe_tag(tag_dir: str) -> dict[str, Any]:
    """One tag folder: its files, whether it is complete, and what its manifest says."""
    files = folder_files(tag_dir)
    info: dict[str, Any] = {"path": tag_dir, "files": files, "bytes": sum(files.values())}
    if os.path.isfile(os.path.join(tag_dir, UNIVERSAL_MANIFEST)) or tag_dir.endswith(UNIVERSAL_SUFFIX):
        info["kind"] = "universal conversion"
        try:
            manifest = read_universal_manifest(tag_dir)
            info.update(complete=True, source=manifest["source"], source_world_size=manifest["source_world_size"],
                        source_zero_stage=manifest["source_zero_stage"])
        except CheckpointError as e:
            info.update(complete=False, problem=str(e))
        return info
    if not os.path.isfile(os.path.join(tag_dir, MANIFEST)) and is_deepspeed_universal(tag_dir):
        info.update(kind="deepspeed universal", complete=None,
                    problem="no zeroloop manifest (DeepSpeed's ds_to_universal output): sizes cannot be checked")
        return info
    info["kind"] = "zeroloop"
    try:
        manifest = read_manifest(tag_dir)
    except CheckpointError as e:
        return {**info, "complete": False, "problem": str(e)}
    layout = saved_layout(manifest)
    state = manifest["train_state"]
    info.update(complete=True, global_step=manifest["global_step"], epoch=state["epoch"],
                epoch_samples=state["epoch_samples"], samples=state["samples"], world_size=layout.world_size,
                zero_stage=layout.zero_stage, precision=layout.precision, offload_optimizer=layout.offload_optimizer,
                offload_param=layout.offload_param, micro_batch_size=manifest["micro_batch_size"],
                gradient_accumulation_steps=manifest["gradient_accumulation_steps"],
                train_batch_size=saved_train_batch(manifest), loss_scale=manifest.get("loss_scale"),
                saved_at=manifest.get("saved_at"), versions=manifest.get("versions"),
                universal_copy=os.path.isdir(tag_dir + UNIVERSAL_SUFFIX))
    return info


def format_inspection(info: dict[str, Any], files: bool = True) -> str:
    """Human-readable lines for what :func:`inspect_checkpoint` returned."""
    if "checkpoints" in info:
        lines = [f"{info['path']}: {len(info['checkpoints'])} tag folder(s), latest = {info['latest']}"]
        for tag in info["checkpoints"]:
            lines += ["", *format_inspection(tag, files=files).splitlines()]
        return "\n".join(lines)
    complete = {True: "complete", False: "INCOMPLETE", None: "not checked"}[info["complete"]]
    lines = [f"{info['path']}  [{info['kind']}, {complete}]"]
    if info.get("problem"):
        lines.append(f"  problem: {info['problem']}")
    if "global_step" in info:
        offload = ", ".join(f"{what} offload: {info[key]}" for what, key in
                            (("optimizer", "offload_optimizer"), ("parameter", "offload_param")) if info[key] != "none")
        lines += [f"  step {info['global_step']}, epoch {info['epoch']} ({info['epoch_samples']} samples into it), "
                  f"{info['samples']} samples in all",
                  f"  world size {info['world_size']}, ZeRO-{info['zero_stage']}, {info['precision']}"
                  + (f", {offload}" if offload else ""),
                  f"  global batch {info['train_batch_size']} = micro-batch {info['micro_batch_size']} x "
                  f"accumulation {info['gradient_accumulation_steps']} x {info['world_size']} rank(s)"]
        if info["precision"] == "fp16" and info.get("loss_scale") is not None:
            lines.append(f"  fp16 loss scale {info['loss_scale']:g}")
        if info.get("saved_at"):
            versions = ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items())
            lines.append(f"  saved {info['saved_at']} ({versions})")
        if info["universal_copy"]:
            lines.append(f"  converted for other layouts: {os.path.basename(info['path'])}{UNIVERSAL_SUFFIX}")
    if "source" in info:
        lines.append(f"  converted from {info['source']} ({info['source_world_size']} rank(s), "
                     f"ZeRO-{info['source_zero_stage']})")
    lines.append(f"  {len(info['files'])} files, {_size(info['bytes'])}")
    if files:
        lines += [f"    {_size(size):>10}  {name}" for name, size in info["files"].items()]
    return "\n".join(lines)


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


__all__ = ["describe_tag", "format_inspection", "inspect_checkpoint"]
