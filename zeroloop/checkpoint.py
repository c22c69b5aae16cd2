"""Checkpoints that resume exactly, survive crashes and preemption, and are never half-visible.

The layout on disk stays DeepSpeed's, so its own tools (``zero_to_fp32.py`` included)
work on it::

    <output_dir>/checkpoints/
        latest                         the tag of the newest complete checkpoint
        global_step8/                  one tag folder per checkpoint
            mp_rank_00_model_states.pt ...   DeepSpeed's files (pickles)
            zeroloop_rank_00000.json   this rank's RNG states (JSON)
            zeroloop_manifest.json     written last: the TrainState, config, versions, file sizes

How a save stays atomic: every rank writes under a temporary tag (``global_step8.tmp``),
all ranks fsync their files and meet at a barrier, then rank 0 writes the manifest,
renames the folder into place and replaces ``latest`` through a temporary file and
``os.replace``, with an fsync of each directory it changed. A crash at any moment leaves
``latest`` naming the previous complete checkpoint; a folder without a manifest (or whose
files do not match the sizes the manifest lists) is never loaded.

zeroloop's own state is JSON, readable without unpickling. DeepSpeed's ``*.pt`` files are
pickles: load checkpoints only from sources you trust. zeroloop itself unpickles nothing;
only DeepSpeed's ``load_checkpoint`` does, after the manifest has been checked.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .config import ConfigError, is_int
from .pretrained import save_pretrained_configs
from .state import TrainState

log = logging.getLogger("zeroloop")

FORMAT = "zeroloop-checkpoint/2"
FORMAT_1 = "zeroloop-checkpoint/1"  # before TrainState: a per-rank count of micro-batches
MANIFEST = "zeroloop_manifest.json"
LATEST = "latest"  # DeepSpeed's name: load_checkpoint(tag=None) reads it too
TMP_SUFFIX = ".tmp"  # a tag folder still being written; never loaded
DELETING_SUFFIX = ".deleting"  # an old checkpoint on its way out; never loaded
REQUIRED_KEYS = ("files", "global_step", "train_state", "world_size", "zero_stage", "micro_batch_size",
                 "gradient_accumulation_steps", "total_steps", "sampler_seed")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or resumed from; the message names the file and the fix."""


@dataclass(frozen=True)
class CheckpointSettings:
    """When to save, how many to keep and what to resume from.

    Attributes:
        every: optimizer steps between checkpoints (None: only the final one and on
            preemption).
        keep: the newest complete checkpoints to keep (>= 1). The checkpoint being written
            and the one this run resumed from are never deleted.
        resume: ``"latest"`` (the newest complete checkpoint in ``folder``, or a fresh start
            when there is none), a path (a tag folder, or a folder holding ``latest``) that
            must exist, or None (always start fresh).
        final: save a checkpoint when training ends.
        folder: where checkpoints go; relative paths are under the loop's ``output_dir``.
        handle_signals: on SIGTERM/SIGINT, save at the next optimizer step and stop
            cleanly; a second signal aborts at once.
        final_weights: when training ends, also write the model as Hugging Face-layout
            safetensors to ``output_dir/final/`` (gathered under ZeRO-3), with
            ``config.json`` (and ``generation_config.json``) for a Hugging Face model so that
            ``from_pretrained(output_dir/final)`` loads it, and most runs never need
            ``zeroloop consolidate``. ``"trainable"``: only the parameters with
            ``requires_grad`` (a run with frozen parameters, e.g. LoRA adapters), as
            ``consolidate --exclude-frozen`` writes. False: no final weights.
    """

    every: int | None = None
    keep: int = 3
    resume: str | os.PathLike | None = "latest"
    final: bool = True
    folder: str | os.PathLike = "checkpoints"
    handle_signals: bool = True
    final_weights: bool | str = True

    def __post_init__(self):
        problems = []
        if self.final_weights not in (True, False, "trainable"):
            problems.append(f"final_weights: must be True, False or \"trainable\", got {self.final_weights!r}")
        if self.every is not None and (not is_int(self.every) or self.every < 1):
            problems.append(f"every: must be a positive number of optimizer steps or None, got {self.every!r}")
        if not is_int(self.keep) or self.keep < 1:
            problems.append(f"keep: must be an integer >= 1 (checkpoints to keep), got {self.keep!r}")
        if problems:
            raise ConfigError(problems, subject="CheckpointSettings")


# --- files: fsync, JSON, latest ---------------------------------------------------------------


def fsync_path(path: str) -> None:
    """Flush a file's or a directory's data and metadata to disk (fsync is per inode, so
    any process may flush a file another one wrote)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_durably(path: str, data: Any) -> None:
    """Write JSON through a temporary file and ``os.replace``, fsyncing file and folder, so
    that ``path`` holds either its old content or the whole new one."""
    tmp = f"{path}{TMP_SUFFIX}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def replace_latest(folder: str, tag: str) -> None:
    """Point ``folder/latest`` at ``tag`` atomically (temporary file, fsync, os.replace)."""
    path = os.path.join(folder, LATEST)
    tmp = f"{path}{TMP_SUFFIX}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(folder)


def rank_file(rank: int) -> str:
    return f"zeroloop_rank_{rank:05d}.json"


# --- RNG states as JSON --------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU and current CUDA device) RNG states, as JSON."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode("ascii")
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_bytes_tensor(state["cuda"]))


def _bytes_tensor(encoded: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.uint8).clone()


# --- finding and checking checkpoints (pure file-system functions, no DeepSpeed) ------------------


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
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e}); this checkpoint is damaged, "
                              "resume from another one") from None
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
        if not os.path.isdir(path) or name.endswith((TMP_SUFFIX, DELETING_SUFFIX)):
            continue
        try:
            found.append((int(read_manifest(path)["global_step"]), path))
        except CheckpointError as e:
            log.debug("not a complete checkpoint: %s", e)
    return sorted(found)


def find_checkpoint(resume: str | os.PathLike | None, folder: str) -> str | None:
    """The tag folder to resume from, or None to start fresh.

    Args:
        resume: ``"latest"``, a path (a tag folder, or a folder holding ``latest``), or None.
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
    read_manifest(path)
    return path


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


def check_compatible(manifest: dict[str, Any], tag_dir: str, *, world_size: int, zero_stage: int,
                     micro_batch_size: int) -> None:
    """Refuse a checkpoint this run cannot continue exactly.

    Raises:
        CheckpointError: the world size, ZeRO stage or micro-batch size differs from the
            saved one; the message says what changed and what to do.
    """
    where = os.path.join(tag_dir, MANIFEST)
    universal = ("DeepSpeed's per-rank ZeRO files only load into the same layout: run with the saved "
                 "setting, or convert the checkpoint to a universal one (python -m "
                 "deepspeed.checkpoint.ds_to_universal --input_folder {tag} --output_folder {tag}_universal) "
                 "and load it with DeepSpeed's \"checkpoint\": {{\"load_universal\": true}}, which zeroloop "
                 "does not resume from yet").format(tag=tag_dir)
    if manifest["world_size"] != world_size:
        raise CheckpointError(f"{where}: saved with world size {manifest['world_size']}, this run has "
                              f"{world_size} ranks. {universal}")
    if manifest["zero_stage"] != zero_stage:
        raise CheckpointError(f"{where}: saved with ZeRO stage {manifest['zero_stage']}, this run's config "
                              f"has zero_optimization.stage={zero_stage}. {universal}")
    if manifest["micro_batch_size"] != micro_batch_size:
        raise CheckpointError(f"{where}: saved with train_micro_batch_size_per_gpu="
                              f"{manifest['micro_batch_size']}, this run uses {micro_batch_size}; the data "
                              "position cannot be mapped: resume with the saved micro-batch size")


def check_same_precision_mode(manifest: dict[str, Any], tag_dir: str, config: dict[str, Any]) -> None:
    """Refuse a checkpoint saved in another precision mode: DeepSpeed's bf16 mode keeps an fp32
    master copy in its optimizer, its autocast mode none, and neither loads the other's state.

    Raises:
        CheckpointError: the modes differ; the message names the section that pins the saved one.
    """
    from .autocast import MODE_SECTIONS, precision_mode

    saved_config = manifest.get("ds_config")
    if not isinstance(saved_config, dict):
        return  # an older manifest without the config: nothing to compare
    saved, current = precision_mode(saved_config), precision_mode(config)
    if saved != current:
        raise CheckpointError(f"{os.path.join(tag_dir, MANIFEST)}: saved in {saved} mode, this run's config "
                              f"resolves to {current} mode, and DeepSpeed's optimizer states do not carry over "
                              f"between modes: resume in the saved mode ({MODE_SECTIONS[saved]} in the config "
                              "pins it)")


# --- the manager -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFacts:
    """What a checkpoint records about the run besides the engine and the :class:`TrainState`.

    Attributes:
        seed: the loop's seed (it decides the data order).
        total_steps: optimizer steps of the whole run, when known (an ``"auto"`` scheduler
            length depends on it).
        ds_config: the resolved DeepSpeed config.
    """

    seed: int
    total_steps: int | None
    ds_config: dict


class Checkpointer:
    """Saves, prunes and resumes the checkpoints of one run.

    It saves and restores the engine (through DeepSpeed), each rank's RNG states and the
    :class:`~zeroloop.state.TrainState` it is given, and nothing else of the loop. The loop
    calls :meth:`resume` at the end of ``setup()``, :meth:`step_end` after every optimizer
    step and :meth:`finish` at the end. :meth:`save` and :meth:`request_stop` are for
    users. Every method that touches files is collective: call it on every rank.

    Args:
        settings: when to save, how many to keep, what to resume from.
        output_dir: the run's folder (``settings.folder`` is relative to it).
        engine: the DeepSpeed engine whose state is saved.
        state: the run's position, saved with it and restored in place on resume.
        facts: what else the manifest records (seed, run length, config).
        before_save: called on every rank before each save (collective), to bring ``state``
            up to date (the loop adds the tokens counted since its last all-reduce).
    """

    def __init__(self, settings: CheckpointSettings, output_dir: str, *, engine: Any, state: TrainState,
                 facts: RunFacts, before_save: Callable[[], None] | None = None):
        import deepspeed.comm as dist

        self.settings = settings
        self.output_dir = output_dir
        self.engine = engine
        self.state = state
        self.facts = facts
        self.before_save = before_save
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.resumed_from: str | None = None
        self.last_saved_step: int | None = None
        self._stop_requested = False
        self._previous_handlers: dict[int, Any] = {}

    @property
    def folder(self) -> str:
        return os.path.join(self.output_dir, os.fspath(self.settings.folder))

    # --- what users call ----------------------------------------------------------------------

    def save(self, tag: str | None = None) -> str:
        """Save a checkpoint of the run's current state, atomically. Collective.

        Args:
            tag: the tag folder's name; default ``global_step{N}``.

        Returns:
            The tag folder, complete and named by ``latest`` when this returns.
        """
        tag = tag or f"global_step{self.state.step}"
        if self.before_save is not None:
            self.before_save()
        path = self._save(tag)
        self.last_saved_step = self.state.step
        if self.rank == 0:
            log.info("checkpoint saved: %s", path)
        return path

    def request_stop(self) -> None:
        """Save and stop at the next optimizer step (what SIGTERM does); may be called on one rank."""
        self._stop_requested = True

    def load(self, tag_dir: str, manifest: dict[str, Any]) -> None:
        """Restore the engine (DeepSpeed), this rank's RNG states and the :class:`TrainState`.

        Raises:
            CheckpointError: DeepSpeed could not load the folder, or its files disagree.
        """
        folder, tag = os.path.split(os.path.abspath(tag_dir))
        try:
            load_path, _ = self.engine.load_checkpoint(folder, tag=tag)
        except Exception as e:  # noqa: BLE001 - reported with the folder and the fix
            raise CheckpointError(f"DeepSpeed could not load {tag_dir}: {type(e).__name__}: {e}") from e
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no model states in {tag_dir}")
        path = os.path.join(tag_dir, rank_file(self.rank))
        with open(path, encoding="utf-8") as f:
            rank_state = json.load(f)
        if rank_state.get("global_step") != manifest["global_step"]:
            raise CheckpointError(f"{path} is from step {rank_state.get('global_step')}, the manifest from step "
                                  f"{manifest['global_step']}; this checkpoint is damaged, resume from another one")
        try:
            self.state.load_state_dict(manifest["train_state"])
        except ValueError as e:
            raise CheckpointError(f"{os.path.join(tag_dir, MANIFEST)}: {e}; this checkpoint is damaged, resume "
                                  "from another one") from None
        set_rng_state(rank_state["rng"])
        replay_cpu_adam_bias_corrections(self.engine)
        self.resumed_from = os.path.abspath(tag_dir)
        self.last_saved_step = manifest["global_step"]

    # --- what the loop calls -----------------------------------------------------------------

    def resume(self) -> str | None:
        """Resume per ``settings.resume``: rank 0 picks and checks the checkpoint, every rank
        loads it. Collective.

        Returns:
            The tag folder resumed from, or None for a fresh start.

        Raises:
            CheckpointError: the checkpoint is missing, damaged or incompatible (on every rank).
        """
        import deepspeed.comm as dist

        choice: list[Any] = [None]
        if self.rank == 0:
            choice[0] = self._choose()
        dist.broadcast_object_list(choice, src=0)
        status, tag_dir, manifest = choice[0]
        if status == "error":
            raise CheckpointError(tag_dir)
        if tag_dir is None:
            return None
        self.load(tag_dir, manifest)
        self._warn_on_changes(manifest)
        if self.rank == 0:
            log.info("resumed from %s at step %d (epoch %d, %d samples into it)", tag_dir, self.state.step,
                     self.state.epoch, self.state.epoch_samples)
        return tag_dir

    def step_end(self) -> bool:
        """After an optimizer step: agree on a stop request, save when due or stopping. Collective.

        Returns:
            True when training must stop (a checkpoint has been saved).
        """
        stop = self._agree_on_stop()
        every = self.settings.every
        if stop or (every and self.state.step % every == 0):
            path = self.save()
            if stop and self.rank == 0:
                log.warning("stop requested (signal or request_stop): saved %s at step %d; stopping. "
                            "Resume with CheckpointSettings(resume=\"latest\")", path, self.state.step)
        return stop

    def finish(self, progress: bool = False) -> None:
        """The final checkpoint (unless turned off or this step is already saved) and the
        final safetensors weights under ``output_dir/final`` (unless turned off). Collective.

        Args:
            progress: show a progress bar while writing the final weights (rank 0).
        """
        if self.settings.final and self.last_saved_step != self.state.step:
            self.save()
        if self.settings.final_weights:
            from .consolidate import save_final_weights

            save_final_weights(self.engine, os.path.join(self.output_dir, "final"),
                               exclude_frozen=self.settings.final_weights == "trainable", progress=progress)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT ask for a save and a clean stop; a second one aborts at once."""
        if not self.settings.handle_signals:
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: signals cannot be caught here
                log.warning("not in the main thread: SIGTERM/SIGINT will not save a checkpoint")
                return

    def remove_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    # --- saving --------------------------------------------------------------------------------

    def _save(self, tag: str) -> str:
        """Write under ``<tag>.tmp``, fsync, barrier, then rank 0 publishes (manifest, rename,
        ``latest``) and prunes."""
        import deepspeed.comm as dist

        rng = rng_state()  # before anything below could draw from a generator
        manifest = self._manifest(tag)
        tmp_tag = f"{tag}{TMP_SUFFIX}"
        tmp_dir = os.path.join(self.folder, tmp_tag)
        if self.rank == 0:
            os.makedirs(self.folder, exist_ok=True)
            shutil.rmtree(tmp_dir, ignore_errors=True)  # left by a crash inside an earlier save
        dist.barrier()
        self.engine.save_checkpoint(self.folder, tag=tmp_tag, client_state={}, save_latest=False)
        if self.rank == 0:  # a Hugging Face model's config.json, for `zeroloop consolidate`
            save_pretrained_configs(self.engine.module, tmp_dir)
        with open(os.path.join(tmp_dir, rank_file(self.rank)), "w", encoding="utf-8") as f:
            json.dump({"rank": self.rank, "global_step": self.state.step, "rng": rng}, f)
        dist.barrier()  # every rank's files exist
        self._fsync_share(tmp_dir)
        dist.barrier()  # every rank's files are on disk
        if self.rank == 0:
            self._publish(tmp_dir, tag, manifest)
            self._prune(keep_also=os.path.join(self.folder, tag))
        dist.barrier()  # nobody returns before the checkpoint is visible
        return os.path.join(self.folder, tag)

    def _fsync_share(self, tmp_dir: str) -> None:
        """This rank's share of fsyncing every file in the folder (fsync works on any file)."""
        names = sorted(os.listdir(tmp_dir))
        for name in names[self.rank::self.world_size]:
            fsync_path(os.path.join(tmp_dir, name))

    def _publish(self, tmp_dir: str, tag: str, manifest: dict[str, Any]) -> None:
        """Rank 0: manifest last, rename into place, then ``latest``; each step durable."""
        manifest["files"] = {name: os.path.getsize(os.path.join(tmp_dir, name))
                             for name in sorted(os.listdir(tmp_dir))}
        write_json_durably(os.path.join(tmp_dir, MANIFEST), manifest)
        final_dir = os.path.join(self.folder, tag)
        if os.path.exists(final_dir):  # the same step saved before (e.g. after resuming an older one)
            self._delete(final_dir)
        os.rename(tmp_dir, final_dir)
        fsync_path(self.folder)
        replace_latest(self.folder, tag)

    def _manifest(self, tag: str) -> dict[str, Any]:
        """zeroloop's JSON state of this checkpoint (``files`` is added when publishing)."""
        import deepspeed

        from . import __version__

        engine = self.engine
        return {
            "format": FORMAT,
            "tag": tag,
            "global_step": self.state.step,
            "train_state": self.state.state_dict(),
            "micro_batch_size": engine.train_micro_batch_size_per_gpu(),
            "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
            "total_steps": self.facts.total_steps,
            "sampler_seed": self.facts.seed,
            "world_size": self.world_size,
            "zero_stage": int(engine.zero_optimization_stage()),
            "lr_scheduler": _json_or_none(engine.lr_scheduler.state_dict() if engine.lr_scheduler else None),
            "loss_scale": _loss_scale(engine),
            "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
            "ds_config": _json_or_none(self.facts.ds_config),
            "versions": {"zeroloop": __version__, "deepspeed": deepspeed.__version__, "torch": torch.__version__},
            "rank_files": [rank_file(r) for r in range(self.world_size)],
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def _prune(self, keep_also: str) -> None:
        """Rank 0: delete complete checkpoints beyond the newest ``keep``; never ``keep_also``
        (the one just written) nor the one this run resumed from."""
        protected = {os.path.abspath(keep_also), self.resumed_from}
        complete = [path for _, path in list_checkpoints(self.folder)]
        for path in complete[:-self.settings.keep]:
            if os.path.abspath(path) not in protected:
                self._delete(path)

    def _delete(self, tag_dir: str) -> None:
        """Make the folder unloadable first (rename it), so a crash mid-delete leaves no
        checkpoint that looks complete but is not."""
        doomed = f"{tag_dir}{DELETING_SUFFIX}"
        shutil.rmtree(doomed, ignore_errors=True)
        os.rename(tag_dir, doomed)
        fsync_path(os.path.dirname(doomed))
        shutil.rmtree(doomed, ignore_errors=True)

    # --- resuming --------------------------------------------------------------------------------

    def _choose(self) -> tuple[str, str | None, dict | None]:
        """Rank 0: ``("ok", tag_dir or None, manifest)`` or ``("error", message, None)``."""
        self._remove_leftovers()
        try:
            tag_dir = find_checkpoint(self.settings.resume, self.folder)
            if tag_dir is None:
                log.info("no checkpoint to resume from in %s: starting fresh", self.folder)
                return "ok", None, None
            manifest = read_manifest(tag_dir)
            check_compatible(manifest, tag_dir, world_size=self.world_size,
                             zero_stage=int(self.engine.zero_optimization_stage()),
                             micro_batch_size=self.engine.train_micro_batch_size_per_gpu())
            check_same_precision_mode(manifest, tag_dir, self.facts.ds_config)
            return "ok", tag_dir, manifest
        except (CheckpointError, OSError) as e:  # every rank raises it, none waits forever
            return "error", str(e), None

    def _remove_leftovers(self) -> None:
        """Rank 0: temporary and half-deleted folders of crashed runs (never loadable)."""
        if not os.path.isdir(self.folder):
            return
        for name in os.listdir(self.folder):
            path = os.path.join(self.folder, name)
            if os.path.isdir(path) and name.endswith((TMP_SUFFIX, DELETING_SUFFIX)):
                log.info("removing %s, left by an interrupted save or delete", path)
                shutil.rmtree(path, ignore_errors=True)

    def _warn_on_changes(self, manifest: dict[str, Any]) -> None:
        """Settings that let training go on but make it differ from an uninterrupted run."""
        changes = []
        if manifest["sampler_seed"] != self.facts.seed:
            changes.append(f"seed {manifest['sampler_seed']} -> {self.facts.seed} (data order changes)")
        if manifest["gradient_accumulation_steps"] != self.engine.gradient_accumulation_steps():
            changes.append(f"gradient_accumulation_steps {manifest['gradient_accumulation_steps']} -> "
                           f"{self.engine.gradient_accumulation_steps()}")
        if manifest["total_steps"] != self.facts.total_steps:
            changes.append(f"total steps {manifest['total_steps']} -> {self.facts.total_steps} (an \"auto\" "
                           "scheduler length changes the LR schedule)")
        if changes and self.rank == 0:
            log.warning("resuming with changed settings, training will differ from an uninterrupted run: %s",
                        "; ".join(changes))

    def _agree_on_stop(self) -> bool:
        """True on every rank when any rank was asked to stop (one small all-reduce)."""
        import deepspeed.comm as dist

        flag = torch.tensor([1 if self._stop_requested else 0], dtype=torch.int32, device=self.engine.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_requested:  # the second signal: abort at once
            self.remove_signal_handlers()
            signal.raise_signal(signum)
            return
        self._stop_requested = True
        log.warning("%s received: saving a checkpoint at the next optimizer step, then stopping "
                    "(send it again to abort at once)", signal.Signals(signum).name)



def replay_cpu_adam_bias_corrections(engine) -> int:
    """Rebuild the bias-correction state DeepSpeed's CPU ``FusedAdam`` keeps outside its checkpoint.

    On the CPU, DeepSpeed's ``FusedAdam`` keeps beta1**t and beta2**t in C++ state that lives
    as long as the process: it multiplies them by beta once per step, but after a jump in the
    step count (a resume in a new process) recomputes them with ``pow``, which differs from
    the running product in the last bits; every resumed update is then 1 ulp off. Replaying
    steps 1..t on empty tensors rebuilds the same running product, so resumed updates are
    bit-identical to an uninterrupted run's. (The CUDA kernel computes them from the step
    on every call and needs nothing.)

    Args:
        engine: a DeepSpeed engine whose optimizer state was just loaded.

    Returns:
        The steps replayed: 0 unless the optimizer is DeepSpeed's FusedAdam on a CPU.
    """
    from deepspeed.ops.adam import FusedAdam
    from deepspeed.ops.adam.fused_adam import multi_tensor_applier

    optimizer = engine.optimizer
    while optimizer is not None and not isinstance(optimizer, FusedAdam):
        optimizer = getattr(optimizer, "optimizer", None)  # ZeRO wraps the torch optimizer
    if optimizer is None or engine.device.type != "cpu" or not optimizer.param_groups:
        return 0
    steps = [int(state["step"]) for state in optimizer.state.values() if "step" in state]
    if not steps:
        return 0
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    empty = [[torch.empty(0, dtype=torch.float32)] for _ in range(4)]  # grads, params, exp_avg, exp_avg_sq
    for step in range(1, max(steps) + 1):
        multi_tensor_applier(optimizer.multi_tensor_adam, optimizer._dummy_overflow_buf, empty, group["lr"],
                             beta1, beta2, group["eps"], step, optimizer.adam_w_mode,
                             1 if group["bias_correction"] else 0, group["weight_decay"])
    return max(steps)


def _json_or_none(value: Any) -> Any:
    """``value`` when JSON can hold it, else None (the manifest must stay plain JSON)."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return None


def _loss_scale(engine) -> float | None:
    """The fp16 loss scale (DeepSpeed saves the scaler with its optimizer state)."""
    scale = getattr(engine.optimizer, "cur_scale", None)
    if scale is None:
        scale = getattr(getattr(engine.optimizer, "loss_scaler", None), "cur_scale", None)
    try:
        return None if scale is None else float(scale)
    except (TypeError, ValueError):
        return None


__all__ = ["CheckpointError", "CheckpointSettings", "Checkpointer", "RunFacts", "check_compatible", "find_checkpoint",
           "list_checkpoints", "read_manifest"]
