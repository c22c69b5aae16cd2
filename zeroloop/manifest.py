"""A checkpoint's manifest and the names on disk: reading and checking a manifest, ``latest``,
the complete checkpoints of a folder (finding the one to resume: :mod:`zeroloop.finding`).

Pure file-system functions, no DeepSpeed: rank 0 runs them before anything is loaded.
A tag folder is a complete checkpoint only when its ``zeroloop_manifest.json`` exists and
every file it lists is there with the listed size (see :mod:`zeroloop.checkpoint`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from .errors import CheckpointError
from .state import TrainState

log = logging.getLogger("zeroloop")

FORMAT = "zeroloop-checkpoint/2"
FORMAT_1 = "zeroloop-checkpoint/1"  # before TrainState: a per-rank count of micro-batches
MANIFEST = "zeroloop_manifest.json"
LATEST = "latest"  # DeepSpeed's name: load_checkpoint(tag=None) reads it too
TMP_SUFFIX = ".tmp"  # a tag folder still being written; never loaded
DELETING_SUFFIX = ".deleting"  # an old checkpoint on its way out; never loaded
UNIVERSAL_SUFFIX = ".universal"  # the cached conversion of <tag> to DeepSpeed's universal layout
RANK_FILE = re.compile(r"zeroloop_rank_\d{5}\.json")  # a rank's RNG states (JSON)
REQUIRED_KEYS = ("files", "global_step", "train_state", "world_size", "zero_stage", "micro_batch_size",
                 "gradient_accumulation_steps", "total_steps", "sampler_seed")


# --- finding and checking checkpoints (pure file-system functions, no DeepSpeed) ------------------


def universal_sibling(tag_dir: str) -> str:
    """Where the cached universal conversion of ``tag_dir`` lives: the sibling ``<tag>.universal``."""
    return f"{os.path.normpath(os.path.abspath(tag_dir))}{UNIVERSAL_SUFFIX}"


def rank_file(rank: int) -> str:
    """The name of ``rank``'s file in a tag folder (its RNG states, as JSON)."""
    return f"zeroloop_rank_{rank:05d}.json"


def read_checkpoint_json(path: str, problem: str) -> Any:
    """A JSON file of a checkpoint (its manifest, a rank's file).

    Raises:
        CheckpointError: it cannot be read or parsed: ``"<path>: <problem> (<why>)"``, the
            checkpoint called damaged.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: {problem} ({e}); this checkpoint is damaged, resume from "
                              "another one") from None


def read_manifest(tag_dir: str) -> dict[str, Any]:
    """The manifest of a complete checkpoint, after checking every file it lists.

    Args:
        tag_dir: a checkpoint's tag folder.

    Returns:
        The manifest (see :meth:`Checkpointer._manifest` for its keys).

    Raises:
        CheckpointError: the folder or its manifest is missing (an interrupted save, or a
            checkpoint not written by zeroloop), the manifest is not valid JSON, or a file it
            lists is missing or has another size (deleted or truncated).
    """
    manifest_path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isdir(tag_dir):
        raise CheckpointError(f"checkpoint folder {tag_dir} does not exist")
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{tag_dir} is not a complete zeroloop checkpoint: {MANIFEST} is missing "
                              "(its save was interrupted, or it was not written by zeroloop)")
    manifest = read_checkpoint_json(manifest_path, "unreadable manifest")
    if isinstance(manifest, dict) and manifest.get("format") == FORMAT_1:
        manifest = upgrade_format_1(manifest)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: not a {FORMAT} manifest (format "
                              f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise CheckpointError(f"{manifest_path}: the manifest lacks {', '.join(missing)}; this checkpoint is "
                              "damaged, resume from another one")
    for name, size in manifest["files"].items():
        path = os.path.join(tag_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing (the manifest lists it); this checkpoint is damaged, "
                                  "resume from another one")
        actual = os.path.getsize(path)
        if actual != size:
            raise CheckpointError(f"{path} is {actual} bytes, the manifest says {size} (truncated or "
                                  "overwritten); this checkpoint is damaged, resume from another one")
    return manifest


def upgrade_format_1(manifest: dict[str, Any]) -> dict[str, Any]:
    """A format-1 manifest (a per-rank count of micro-batches into the epoch) in today's terms."""
    upgraded = dict(manifest, format=FORMAT)
    try:
        upgraded["train_state"] = TrainState(
            step=manifest["global_step"], epoch=manifest["epoch"],
            epoch_samples=manifest["batches_in_epoch"] * manifest["micro_batch_size"] * manifest["world_size"],
        ).state_dict()
    except KeyError:
        pass  # reported as a missing key by read_manifest
    return upgraded


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """``(global_step, tag folder)`` of every complete checkpoint in ``folder``, oldest first.

    Folders that fail :func:`read_manifest` are left out (with a debug log line).
    """

    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if not os.path.isdir(path) or name.endswith((TMP_SUFFIX, DELETING_SUFFIX, UNIVERSAL_SUFFIX)):
            continue
        try:
            found.append((int(read_manifest(path)["global_step"]), path))
        except CheckpointError as e:
            log.debug("not a complete checkpoint: %s", e)
    return sorted(found)


def read_latest(folder: str) -> str | None:
    """The tag ``folder/latest`` names, or None when there is none or it cannot be read."""
    try:
        with open(os.path.join(folder, LATEST), encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


__all__ = ["CheckpointError", "list_checkpoints", "read_latest", "read_manifest", "universal_sibling"]
