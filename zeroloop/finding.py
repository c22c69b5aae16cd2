"""Finding the checkpoint to resume: what ``"latest"`` or a path names, checked, or the newest
complete checkpoint when ``latest`` is missing or damaged.

Pure file-system functions, no DeepSpeed: rank 0 runs them before anything is loaded. A
folder DeepSpeed's ``ds_to_universal`` wrote is accepted too (:mod:`zeroloop.universal` gives
its manifest), which is why this is not part of :mod:`zeroloop.manifest`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .errors import CheckpointError
from .manifest import LATEST, MANIFEST, list_checkpoints, read_manifest
from .universal import deepspeed_universal_manifest, is_deepspeed_universal

log = logging.getLogger("zeroloop")


def find_checkpoint(resume: str | os.PathLike | None, folder: str) -> str | None:
    """The tag folder to resume from, or None to start fresh.

    Args:
        resume: ``"latest"``, a path (a tag folder, a folder holding ``latest``, or a
            universal checkpoint written by DeepSpeed's ``ds_to_universal``), or None.
        folder: the run's checkpoint folder (used by ``"latest"``).

    Returns:
        A tag folder whose manifest and files check out, or None (``resume`` is None, or
        ``"latest"`` and ``folder`` holds no checkpoint at all).

    Raises:
        CheckpointError: a ``resume`` path that does not exist or is incomplete; a
            ``latest`` whose checkpoint is damaged when no other complete one exists.
    """
    if resume is None:
        return None
    if os.fspath(resume) == "latest":
        return _newest_complete(folder, explicit=False)
    path = os.path.abspath(os.fspath(resume))
    if not os.path.exists(path):
        raise CheckpointError(f"resume={os.fspath(resume)!r}: no such file or folder; pass the tag folder of a "
                              f"checkpoint (e.g. {os.path.join(folder, 'global_step100')}), resume=\"latest\" for "
                              "the newest one in the run's checkpoint folder, or resume=None to start fresh")
    if os.path.isfile(os.path.join(path, LATEST)) and not os.path.isfile(os.path.join(path, MANIFEST)):
        return _newest_complete(path, explicit=True)
    read_checkpoint(path)
    return path


def read_checkpoint(tag_dir: str) -> dict[str, Any]:
    """The manifest of a checkpoint to resume from: zeroloop's (:func:`read_manifest`), or,
    for a universal checkpoint written by DeepSpeed's ``ds_to_universal``, one made from
    its model-states file (:func:`zeroloop.universal.deepspeed_universal_manifest`).

    Raises:
        CheckpointError: as :func:`read_manifest`.
    """
    if not os.path.isfile(os.path.join(tag_dir, MANIFEST)) and is_deepspeed_universal(tag_dir):
        return deepspeed_universal_manifest(tag_dir)
    return read_manifest(tag_dir)


def _newest_complete(folder: str, explicit: bool) -> str | None:
    """What ``latest`` names when complete; otherwise the newest complete checkpoint, with a warning."""
    latest_path = os.path.join(folder, LATEST)
    complete = list_checkpoints(folder)
    if not os.path.isfile(latest_path):
        if complete:
            log.warning("%s is missing; resuming from the newest complete checkpoint, %s", latest_path,
                        complete[-1][1])
            return complete[-1][1]
        if explicit:
            raise CheckpointError(f"{folder} holds no complete checkpoint")
        return None
    with open(latest_path, encoding="utf-8") as f:
        tag = f.read().strip()
    try:
        return _checked(os.path.join(folder, tag), latest_path)
    except CheckpointError as problem:
        if not complete:
            raise CheckpointError(f"{latest_path} names {tag!r}, which cannot be resumed from: {problem}. "
                                  f"No other complete checkpoint is in {folder}; pass resume=None to start "
                                  "fresh") from None
        log.warning("%s names %r, which cannot be resumed from (%s); resuming from the newest complete "
                    "checkpoint, %s", latest_path, tag, problem, complete[-1][1])
        return complete[-1][1]


def _checked(tag_dir: str, named_by: str) -> str:
    if not tag_dir or not os.path.isdir(tag_dir):
        raise CheckpointError(f"the tag folder {tag_dir} named by {named_by} does not exist")
    read_manifest(tag_dir)
    return tag_dir


__all__ = ["find_checkpoint", "read_checkpoint"]
