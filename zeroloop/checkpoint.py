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
all ranks fsync their files and agree that every write worked (a failed write on any rank
fails the save on all of them, see ``Checkpointer._agree``), then rank 0 writes the manifest,
renames the folder into place and replaces ``latest`` through a temporary file and
``os.replace``, with an fsync of each directory it changed. A crash at any moment leaves
``latest`` naming the previous complete checkpoint; a folder without a manifest (or whose
files do not match the sizes the manifest lists) is never loaded.

A checkpoint resumes on any world size and ZeRO stage: the same layout loads DeepSpeed's
files as they are; another one loads through DeepSpeed's universal checkpoint, converted
once into the sibling folder ``global_step8.universal`` (:mod:`zeroloop.universal`), and
what changed is reported (:mod:`zeroloop.resume`).

zeroloop's own state is JSON, readable without unpickling. DeepSpeed's ``*.pt`` files are
pickles: load checkpoints only from sources you trust. zeroloop itself unpickles nothing;
only DeepSpeed's ``load_checkpoint`` does, after the manifest has been checked (and the
universal conversion, which reads the same pickles).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from . import runtime
from .adam_replay import replay_cpu_adam_bias_corrections
from .config import is_positive_int
from .errors import CheckpointError, ConfigError
from .pretrained import save_pretrained_configs
from .resume import ResumePlan, plan_resume, reapply, seed_rank
from .state import TrainState
from .manifest import (DELETING_SUFFIX, FORMAT, LATEST, MANIFEST, TMP_SUFFIX, find_checkpoint, list_checkpoints,
                       read_checkpoint, read_manifest)
from .universal import convert_collectively, read_universal_manifest, universal_sibling
from .universal_load import load_universal

log = logging.getLogger("zeroloop")

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
            cleanly; a second SIGINT aborts at once, a repeated SIGTERM is ignored
            (launchers and schedulers send it more than once).
        final_weights: when training ends, also write the model as Hugging Face-layout
            safetensors to ``output_dir/final/`` (gathered under ZeRO-3), with
            ``config.json`` (and ``generation_config.json``) for a Hugging Face model so that
            ``from_pretrained(output_dir/final)`` loads it, and most runs never need
            ``zeroloop consolidate``. ``"trainable"``: only the parameters with
            ``requires_grad`` (a run with frozen parameters, e.g. LoRA adapters), as
            ``consolidate --exclude-frozen`` writes. False: no final weights. Not when a stop
            request (a signal, ``request_stop``) ended the run early: the resumed run writes them.
    """

    every: int | None = None
    keep: int = 3
    resume: str | os.PathLike | None = "latest"
    final: bool = True
    folder: str | os.PathLike = "checkpoints"
    handle_signals: bool = True
    final_weights: bool | str = True

    def problems(self) -> list[str]:
        """Every problem with these settings, one line each naming the field and the fix
        (empty when they are good); the loop raises them in one ConfigError."""
        found = []
        if self.final_weights not in (True, False, "trainable"):
            found.append(f"checkpoint.final_weights: must be True, False or \"trainable\", "
                         f"got {self.final_weights!r}")
        if self.every is not None and not is_positive_int(self.every):
            found.append(f"checkpoint.every: must be a positive number of optimizer steps or None, "
                         f"got {self.every!r}")
        if not is_positive_int(self.keep):
            found.append(f"checkpoint.keep: must be an integer >= 1 (checkpoints to keep), got {self.keep!r}")
        return found


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


# What DeepSpeed's ds_to_universal requires in the model states ("universal_checkpoint_info"),
# and which only Megatron-DeepSpeed writes: without it the tool asks for --inject_missing_state.
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


def folder_files(folder: str) -> dict[str, int]:
    """``{path relative to folder: bytes}`` of every file under ``folder``, sorted."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = os.path.getsize(path)
    return dict(sorted(found.items()))


def read_latest(folder: str) -> str | None:
    """The tag ``folder/latest`` names, or None when there is none or it cannot be read."""
    try:
        with open(os.path.join(folder, LATEST), encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def attempt(write: Callable[..., Any], *args: Any) -> str | None:
    """Run one stage of a save; None when it worked, else what failed (path and reason), for
    :meth:`Checkpointer._agree` to share with every rank."""
    try:
        write(*args)
    except Exception as e:  # noqa: BLE001 - every rank must learn of it, whatever it is
        return describe_write_error(e)
    return None


def describe_write_error(error: BaseException, path: str | None = None) -> str:
    """``"<path>: <error> (<what the file system says>)"``; OSErrors name their path
    themselves. torch's zip writer reports a full disk as "unexpected pos 704 vs 598", so
    the reason is also looked up: free space, a read-only file system, the file-size limit."""
    text = f"{type(error).__name__}: {error}"
    filename = getattr(error, "filename", None)
    if path is not None and (filename is None or os.fspath(filename) != path):
        text = f"{path}: {text}"
    target = path or (os.fspath(filename) if filename is not None else None)
    hints = write_failure_hints(target) if target else []
    return f"{text} ({'; '.join(hints)})" if hints else text


def write_failure_hints(path: str) -> list[str]:
    """What may stop writes to ``path``: a nearly full or read-only file system, or a
    file-size limit on this process."""
    import resource

    hints = []
    folder = os.path.dirname(os.path.abspath(path))
    while folder and not os.path.exists(folder):  # the temporary folder may be gone already
        folder = os.path.dirname(folder)
    try:
        fs = os.statvfs(folder)
        free = fs.f_bavail * fs.f_frsize
        if fs.f_flag & os.ST_RDONLY:
            hints.append(f"the file system holding {folder} is read-only")
        elif free < 64 * 2**20:
            amount = f"{free / 2**20:.1f} MiB" if free >= 2**20 else f"{free} bytes"
            hints.append(f"the file system holding {folder} has {amount} free")
    except OSError:
        pass
    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit != resource.RLIM_INFINITY:
        hints.append(f"this process may not write files over {limit} bytes (RLIMIT_FSIZE, `ulimit -f`)")
    return hints


class _RecordingCheckpointEngine:
    """DeepSpeed's checkpoint engine for the length of one save, recording a failed write
    instead of raising it.

    A rank that raises inside ``engine.save_checkpoint`` never reaches the barrier at its
    end: the other ranks wait there as long as it lives, then die of a transport error
    ("Connection closed by peer") that hides the real one. Recording the first error (and
    skipping the writes after it) lets every rank finish the call; the save then fails on
    all of them together, with that error.
    """

    def __init__(self, inner: Any):
        self.inner = inner
        self.error: str | None = None

    def save(self, state_dict: Any, path: str) -> None:
        if self.error is None:
            try:
                self.inner.save(state_dict, path)
            except Exception as e:  # noqa: BLE001 - reported on every rank by the caller
                self.error = describe_write_error(e, path)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        try:
            self.inner.makedirs(path, exist_ok=exist_ok)
        except OSError as e:
            self.error = self.error or describe_write_error(e, path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextlib.contextmanager
def write_errors_recorded(engine: Any) -> Iterator[_RecordingCheckpointEngine]:
    """For one ``engine.save_checkpoint`` call: its file writes record their errors
    instead of raising them (see :class:`_RecordingCheckpointEngine`). The copy of
    DeepSpeed's recovery scripts (``zero_to_fp32.py``) is rank 0's only other write there."""
    recorder = _RecordingCheckpointEngine(engine.checkpoint_engine)
    copy_scripts = getattr(engine, "_copy_recovery_script", None)
    patched_before = vars(engine).get("_copy_recovery_script")

    def copy_scripts_recording(save_path: str) -> None:
        if recorder.error is not None:
            return  # the save failed already: do not truncate the scripts there on a full disk
        try:
            copy_scripts(save_path)
        except OSError as e:
            recorder.error = describe_write_error(e)

    engine.checkpoint_engine = recorder
    if copy_scripts is not None:
        engine._copy_recovery_script = copy_scripts_recording
    try:
        yield recorder
    finally:
        engine.checkpoint_engine = recorder.inner
        if patched_before is not None:
            engine._copy_recovery_script = patched_before
        elif copy_scripts is not None:
            del engine._copy_recovery_script  # the class's method again


RANK_FILE = re.compile(r"zeroloop_rank_\d{5}\.json")


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


# --- the manager -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFacts:
    """What a checkpoint records about the run besides the engine and the :class:`TrainState`.

    Attributes:
        seed: the loop's seed (it decides the data order).
        total_steps: optimizer steps of the whole run, when known (an ``"auto"`` scheduler
            length depends on it).
        ds_config: the resolved DeepSpeed config.
        samples_per_epoch: samples (over all ranks) a whole epoch trains, when known.
    """

    seed: int
    total_steps: int | None
    ds_config: dict
    samples_per_epoch: int | None = None


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
        node_local: the config asks for node-local storage; read while ``engine`` is None
            (the loop picks the checkpoint before building the engine), the engine's
            setting afterwards.

    Raises:
        ConfigError: the settings' :meth:`~CheckpointSettings.problems`, all listed.
    """

    def __init__(self, settings: CheckpointSettings, output_dir: str, *, engine: Any, state: TrainState,
                 facts: RunFacts, before_save: Callable[[], None] | None = None, node_local: bool = False):
        import deepspeed.comm as dist

        if settings.problems():
            raise ConfigError(settings.problems(), subject="CheckpointSettings")
        self.node_local_before_engine = node_local
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
        self.stopped = False  # training was stopped (signal or request_stop) and saved
        self._interrupted = False  # a SIGINT was received: the next one aborts
        self._previous_handlers: dict[int, Any] = {}

    @property
    def folder(self) -> str:
        return os.path.join(self.output_dir, os.fspath(self.settings.folder))

    @property
    def node_local(self) -> bool:
        """DeepSpeed's ``"checkpoint": {"use_node_local_storage": true}``: each machine keeps
        the files of its own ranks in its own ``folder`` (a local disk), not a shared one."""
        use = getattr(self.engine, "use_node_local_storage", None)
        return bool(use()) if callable(use) else self.node_local_before_engine

    @property
    def _keeps_folder(self) -> bool:
        """This rank prepares, publishes and prunes the folder: rank 0, or with node-local
        storage the first rank of each machine (as DeepSpeed picks its writers)."""
        return (runtime.local_rank() if self.node_local else self.rank) == 0

    def _folder_sharers(self) -> tuple[int, int]:
        """(this rank's index, count) among the ranks that write to this rank's folder."""
        if self.node_local:
            return runtime.local_rank(), runtime.local_world_size()
        return self.rank, self.world_size

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

    def load(self, tag_dir: str, manifest: dict[str, Any], plan: ResumePlan | None = None) -> None:
        """Restore the engine (DeepSpeed), this rank's RNG states and the :class:`TrainState`.
        Collective.

        Args:
            tag_dir: the checkpoint (a zeroloop tag folder, or a DeepSpeed universal one).
            manifest: its manifest (:func:`read_checkpoint`).
            plan: how to resume it (default: :meth:`plan` of this run).

        Raises:
            CheckpointError: DeepSpeed could not load the folder, or its files disagree.
        """
        plan = plan or self.plan(manifest)
        if plan.universal:
            load_universal(self.engine, tag_dir if manifest.get("universal") else self._universal_copy(tag_dir))
        else:
            self._load_native(tag_dir)
        rng = self._rank_rng(tag_dir, manifest) if plan.same_ranks and not manifest.get("universal") else None
        try:
            self.state.load_state_dict(self._train_state(manifest))
        except ValueError as e:
            raise CheckpointError(f"{os.path.join(tag_dir, MANIFEST)}: {e}; this checkpoint is damaged, resume "
                                  "from another one") from None
        if rng is not None:
            set_rng_state(rng)
        else:  # another number of ranks: per-rank streams cannot be mapped (see zeroloop.resume)
            seed_rank(self.facts.seed, self.state.step, self.rank)
        replay_cpu_adam_bias_corrections(self.engine)
        reapply(self.engine, self.facts.ds_config, plan.reapply)
        self.resumed_from = os.path.abspath(tag_dir)
        self.last_saved_step = manifest["global_step"]

    def plan(self, manifest: dict[str, Any]) -> ResumePlan:
        """How ``manifest``'s checkpoint resumes into this run (:func:`zeroloop.resume.plan_resume`)."""
        plan = plan_resume(manifest, self.facts.ds_config, self.world_size, seed=self.facts.seed,
                           total_steps=self.facts.total_steps, samples_per_epoch=self.facts.samples_per_epoch)
        if plan.universal and self.node_local:
            plan.refused.append("another layout with node-local storage: the conversion needs every rank's files, "
                                "and each machine holds only its own; copy every machine's tag folder into one "
                                "folder and resume from it (resume=\"path/to/global_stepN\") without "
                                "use_node_local_storage, or resume on the saved layout")
        return plan

    # --- what the loop calls -----------------------------------------------------------------

    def choose(self) -> tuple[str, dict[str, Any]] | None:
        """Rank 0 picks the checkpoint per ``settings.resume`` and checks it (with node-local
        storage, every machine looks in its own folder and they agree on a step). Collective;
        needs no engine (the loop calls it before building one, to keep the saved batch).

        Returns:
            ``(tag folder, manifest)`` on every rank, or None for a fresh start.

        Raises:
            CheckpointError: the checkpoint is missing or damaged (on every rank).
        """
        import deepspeed.comm as dist

        if self.node_local:
            status, tag_dir, manifest = self._choose_on_every_machine()
        else:
            choice: list[Any] = [None]
            if self.rank == 0:
                choice[0] = self._choose()
            dist.broadcast_object_list(choice, src=0)
            status, tag_dir, manifest = choice[0]
        if status == "error":
            raise CheckpointError(tag_dir)
        return None if tag_dir is None else (tag_dir, manifest)

    def resume(self, choice: Any = "choose", plan: ResumePlan | None = None) -> str | None:
        """Resume per ``settings.resume`` (or the ``choice`` :meth:`choose` made): every rank
        loads it, in this run's layout, and one line reports what changed. Collective.

        Returns:
            The tag folder resumed from, or None for a fresh start.

        Raises:
            CheckpointError: the checkpoint is missing, damaged, or differs from this run in
                a way that cannot be resumed (on every rank; each difference and its fix listed).
        """
        choice = self.choose() if choice == "choose" else choice
        if choice is None:
            return None
        tag_dir, manifest = choice
        plan = plan or self.plan(manifest)
        if plan.refused:
            raise CheckpointError(f"{tag_dir} cannot be resumed by this run: " + "; ".join(plan.refused))
        self.load(tag_dir, manifest, plan)
        if self.rank == 0:
            if plan.changes:
                log.warning("resuming %s with changes: %s", tag_dir, plan.report())
            log.info("resumed from %s at step %d (epoch %d, %d samples into it)", tag_dir, self.state.step,
                     self.state.epoch, self.state.epoch_samples)
        return tag_dir

    def step_end(self) -> bool:
        """After an optimizer step: agree on a stop request, save when due or stopping. Collective.

        Returns:
            True when training must stop (a checkpoint has been saved).
        """
        stop = self._agree_on_stop()
        self.stopped = self.stopped or stop
        every = self.settings.every
        if stop or (every and self.state.step % every == 0):
            path = self.save()
            if stop and self.rank == 0:
                log.warning("stop requested (signal or request_stop): saved %s at step %d; stopping. "
                            "Resume with CheckpointSettings(resume=\"latest\")", path, self.state.step)
        return stop

    def finish(self, progress: bool = False) -> None:
        """The final checkpoint (unless turned off or this step is already saved) and the
        final safetensors weights under ``output_dir/final`` (unless turned off, or training
        was stopped before its end: a stopping job has a grace period to leave in, and
        gathering a large model takes long; the weights come when the resumed run ends).
        Collective.

        Args:
            progress: show a progress bar while writing the final weights (rank 0).
        """
        if self.settings.final and self.last_saved_step != self.state.step:
            self.save()
        if self.stopped and self.settings.final_weights:
            log.info("stopped before the end of training: no final weights are written now (the run that "
                     "resumes and ends writes them)")
        elif self.settings.final_weights:
            from .consolidate import save_final_weights

            save_final_weights(self.engine, os.path.join(self.output_dir, "final"),
                               exclude_frozen=self.settings.final_weights == "trainable", progress=progress)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT ask for a save and a clean stop; a second SIGINT aborts at once.

        A repeated SIGTERM is logged and ignored: a rank often gets several for one stop
        (SLURM signals every process of the job and the launcher forwards its own copy;
        a launcher that exits makes the rank send itself one), and the last of them must
        not kill a rank half-way through its save. The scheduler's SIGKILL at the end of
        its grace period remains the hard stop; a second Ctrl-C (SIGINT) is the user's.
        """
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
        """Write under ``<tag>.tmp``, fsync, then rank 0 publishes (manifest, rename,
        ``latest``) and prunes; with node-local storage the first rank of every machine does
        this in its own folder. The ranks agree after each stage, so a write that fails on
        any rank fails the save on every rank, with the same error and nothing left visible.

        Raises:
            CheckpointError: a file could not be written (disk full, file-size limit, a
                read-only or vanished folder, an fsync error), on every rank.
        """
        engine = self.engine
        rng = rng_state()  # before anything below could draw from a generator
        manifest = self._manifest(tag)
        tmp_dir = os.path.join(self.folder, f"{tag}{TMP_SUFFIX}")
        keeps_folder, previous = self._keeps_folder, read_latest(self.folder)
        self._agree(tag, tmp_dir, attempt(self._prepare, tmp_dir) if keeps_folder else None)
        with write_errors_recorded(engine) as recorded:
            # The universal-checkpoint marker lets DeepSpeed's ds_to_universal convert it as it is.
            engine.save_checkpoint(self.folder, tag=os.path.basename(tmp_dir), client_state=dict(UNIVERSAL_INFO),
                                   save_latest=False)
        error = recorded.error or attempt(self._write_rank_file, tmp_dir, rng)
        if error is None and keeps_folder:  # a Hugging Face model's config.json, for `zeroloop consolidate`
            error = attempt(save_pretrained_configs, engine.module, tmp_dir)
        self._agree(tag, tmp_dir, error)  # every rank's files exist
        self._agree(tag, tmp_dir, attempt(self._fsync_share, tmp_dir))  # every rank's files are on disk
        error = attempt(self._publish, tmp_dir, tag, manifest) if keeps_folder else None
        # Visible everywhere before anyone returns; a machine whose publish worked takes it
        # back when another's failed (node-local storage), so no machine keeps it alone.
        undo = (lambda: self._unpublish(tmp_dir, tag, previous)) if keeps_folder and error is None else None
        self._agree(tag, tmp_dir, error, undo=undo)
        if keeps_folder:
            self._prune(keep_also=os.path.join(self.folder, tag))
        return os.path.join(self.folder, tag)

    def _prepare(self, tmp_dir: str) -> None:
        """An empty temporary tag folder (one left by a crashed save is replaced);
        a folder that cannot be written fails here, with its own name in the error."""
        os.makedirs(self.folder, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)

    def _write_rank_file(self, tmp_dir: str, rng: dict[str, Any]) -> None:
        with open(os.path.join(tmp_dir, rank_file(self.rank)), "w", encoding="utf-8") as f:
            json.dump({"rank": self.rank, "global_step": self.state.step, "rng": rng}, f)

    def _agree(self, tag: str, tmp_dir: str, error: str | None, undo: Callable[[], None] | None = None) -> None:
        """Every rank learns whether any rank failed a stage of the save. Collective.

        Args:
            undo: called on this rank when another failed (what this rank's stage changed).

        Raises:
            CheckpointError: some rank failed; raised on every rank, after the temporary
                folder was removed (a full disk gets its space back; a ``.tmp`` folder that
                cannot be removed is never loaded and goes at the next resume).
        """
        import deepspeed.comm as dist

        errors: list[str | None] = [None] * self.world_size
        dist.all_gather_object(errors, error)
        failures = [f"rank {rank}: {problem}" for rank, problem in enumerate(errors) if problem]
        if not failures:
            return
        if undo is not None:
            with contextlib.suppress(OSError):
                undo()
        if self._keeps_folder:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        latest = read_latest(self.folder)
        kept = (f"`latest` still names {latest}, which is complete" if latest else
                "no earlier checkpoint exists in this folder")
        raise CheckpointError(f"checkpoint {tag} could not be written to {self.folder}: {'; '.join(failures)}. "
                              f"Nothing of it was kept: {kept}. Free space or fix the folder (permissions, "
                              "quota, file-size limit, a read-only mount), then resume with resume=\"latest\"")

    def _fsync_share(self, tmp_dir: str) -> None:
        """This rank's share of fsyncing every file and sub-folder in the folder (fsync works
        on any file; NVMe offload saves its swap files in ``offloaded_tensors/``)."""
        index, count = self._folder_sharers()
        names = sorted(folder_files(tmp_dir)) + [os.path.relpath(root, tmp_dir) for root, _, _ in os.walk(tmp_dir)]
        for name in names[index::count]:
            fsync_path(os.path.join(tmp_dir, name))

    def _publish(self, tmp_dir: str, tag: str, manifest: dict[str, Any]) -> None:
        """Manifest last, rename into place, then ``latest``; each step durable. If
        ``latest`` cannot be replaced, the renamed folder goes back to its temporary name,
        so that a failed save leaves the folder as it was.

        The manifest lists the files of this folder (those in sub-folders by their relative
        path), so with node-local storage each machine's manifest lists (and resuming
        checks) the files that machine holds.
        """
        manifest["files"] = folder_files(tmp_dir)
        if self.node_local:
            manifest["node_local"] = True
            manifest["rank_files"] = [name for name in manifest["files"] if RANK_FILE.fullmatch(name)]
        write_json_durably(os.path.join(tmp_dir, MANIFEST), manifest)
        final_dir = os.path.join(self.folder, tag)
        if os.path.exists(final_dir):  # the same step saved before (e.g. after resuming an older one)
            self._delete(final_dir)
        os.rename(tmp_dir, final_dir)
        try:
            fsync_path(self.folder)
            replace_latest(self.folder, tag)
        except OSError:
            with contextlib.suppress(OSError):
                os.rename(final_dir, tmp_dir)
            raise

    def _unpublish(self, tmp_dir: str, tag: str, previous: str | None) -> None:
        """Take a published checkpoint back: ``latest`` names ``previous`` again (or goes),
        and the folder returns to its temporary name (removed by the caller)."""
        if previous is not None:
            replace_latest(self.folder, previous)
        else:
            os.remove(os.path.join(self.folder, LATEST))
        os.rename(os.path.join(self.folder, tag), tmp_dir)

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
            "train_batch_size": engine.train_batch_size(),
            "samples_per_epoch": self.facts.samples_per_epoch,
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
        """Delete complete checkpoints beyond the newest ``keep``; never ``keep_also``
        (the one just written) nor the one this run resumed from. One that cannot be deleted
        is left with a warning: the new checkpoint is saved either way."""
        protected = {os.path.abspath(keep_also), self.resumed_from}
        try:
            complete = [path for _, path in list_checkpoints(self.folder)]
            for path in complete[:-self.settings.keep]:
                if os.path.abspath(path) not in protected:
                    self._delete(path)
                    if os.path.isdir(universal_sibling(path)):  # its cached conversion goes with it
                        self._delete(universal_sibling(path))
        except OSError as e:
            log.warning("could not delete old checkpoints in %s (keep=%d): %s", self.folder, self.settings.keep, e)

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
        return self._find_and_check()

    def _choose_on_every_machine(self) -> tuple[str, str | None, dict | None]:
        """With node-local storage: every rank looks in its own machine's folder, and all
        take the same step, the newest complete on every machine (a crash can leave one
        machine a save ahead). As :meth:`_choose`, on every rank. Collective."""
        import deepspeed.comm as dist

        if self._keeps_folder:
            self._remove_leftovers()
        dist.barrier()  # no rank reads a folder while its machine's first rank cleans it
        status, found, manifest = self._find_and_check()
        complete = dict(list_checkpoints(self.folder))
        views: list[Any] = [None] * self.world_size
        dist.all_gather_object(views, (status, found, manifest and manifest["global_step"], sorted(complete)))
        errors = [f"rank {rank}: {view[1]}" for rank, view in enumerate(views) if view[0] == "error"]
        if errors:
            return "error", "; ".join(errors), None
        chosen = {view[2] for view in views}
        if len(chosen) == 1:
            return status, found, manifest  # the same step on every machine, or a fresh start everywhere
        common = set.intersection(*(set(view[3]) for view in views))
        if not common:
            steps = ", ".join(f"rank {rank}: {view[2]}" for rank, view in enumerate(views))
            return "error", (f"no checkpoint is complete on every machine ({steps}; node-local storage: each "
                             "machine must keep its own ranks' files in its own folder). Copy a machine's "
                             "missing checkpoint back, or pass resume=None to start fresh"), None
        step = max(common)
        if self.rank == 0:
            log.warning("the machines' newest complete checkpoints differ (%s): resuming from step %d, the "
                        "newest on every machine", sorted(chosen, key=lambda s: (s is None, s)), step)
        return "ok", complete[step], read_manifest(complete[step])

    def _find_and_check(self) -> tuple[str, str | None, dict | None]:
        """The checkpoint ``settings.resume`` names in this rank's folder, checked; as :meth:`_choose`."""
        try:
            tag_dir = find_checkpoint(self.settings.resume, self.folder)
            if tag_dir is None:
                log.info("no checkpoint to resume from in %s: starting fresh", self.folder)
                return "ok", None, None
            return "ok", tag_dir, read_checkpoint(tag_dir)
        except (CheckpointError, OSError) as e:  # every rank raises it, none waits forever
            return "error", str(e), None

    def _remove_leftovers(self) -> None:
        """Temporary and half-deleted folders of crashed runs (never loadable), and
        interrupted universal conversions."""
        if not os.path.isdir(self.folder):
            return
        for name in os.listdir(self.folder):
            path = os.path.join(self.folder, name)
            if os.path.isdir(path) and name.endswith((TMP_SUFFIX, DELETING_SUFFIX)):
                log.info("removing %s, left by an interrupted save, delete or conversion", path)
                shutil.rmtree(path, ignore_errors=True)

    def _load_native(self, tag_dir: str) -> None:
        """DeepSpeed's own ``load_checkpoint`` (the layout the checkpoint was saved with)."""
        folder, tag = os.path.split(os.path.abspath(tag_dir))
        try:
            load_path, _ = self.engine.load_checkpoint(folder, tag=tag)
        except Exception as e:  # noqa: BLE001 - reported with the folder and the fix
            raise CheckpointError(f"DeepSpeed could not load {tag_dir}: {type(e).__name__}: {e}") from e
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no model states in {tag_dir}")

    def _universal_copy(self, tag_dir: str) -> str:
        """The universal sibling of ``tag_dir``: reused when complete, else converted now, the
        work shared between the ranks. Collective."""
        import deepspeed.comm as dist

        sibling = universal_sibling(tag_dir)
        ready = [read_universal_manifest(sibling, quiet=True) is not None] if self.rank == 0 else [False]
        dist.broadcast_object_list(ready, src=0)
        if ready[0]:
            return sibling
        return convert_collectively(tag_dir, rank=self.rank, world_size=self.world_size, barrier=dist.barrier,
                                    all_ok=self._on_every_rank)

    def _rank_rng(self, tag_dir: str, manifest: dict[str, Any]) -> dict[str, Any]:
        path = os.path.join(tag_dir, rank_file(self.rank))
        try:
            with open(path, encoding="utf-8") as f:
                rank_state = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot be read ({e}); this checkpoint is damaged, resume from "
                                  "another one") from None
        if rank_state.get("global_step") != manifest["global_step"]:
            raise CheckpointError(f"{path} is from step {rank_state.get('global_step')}, the manifest from step "
                                  f"{manifest['global_step']}; this checkpoint is damaged, resume from another one")
        return rank_state["rng"]

    def _train_state(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """The saved TrainState; for a DeepSpeed universal checkpoint (which records only
        DeepSpeed's sample count), the position that count reaches in this run's epochs."""
        state = dict(manifest["train_state"])
        per_epoch = self.facts.samples_per_epoch
        if manifest.get("universal") and per_epoch:
            state["epoch"], state["epoch_samples"] = divmod(state["samples"], per_epoch)
        return state

    def _on_every_rank(self, flag: bool) -> bool:
        import deepspeed.comm as dist

        value = torch.tensor([int(flag)], dtype=torch.int32, device=self.engine.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def _agree_on_stop(self) -> bool:
        """True on every rank when any rank was asked to stop (one small all-reduce)."""
        import deepspeed.comm as dist

        flag = torch.tensor([1 if self._stop_requested else 0], dtype=torch.int32, device=self.engine.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self._interrupted:  # a second Ctrl-C: abort at once
            self.remove_signal_handlers()
            signal.raise_signal(signum)
            return
        self._interrupted = self._interrupted or signum == signal.SIGINT
        if self._stop_requested:
            log.info("%s received again: already saving and stopping (SIGINT twice aborts at once)", name)
            return
        self._stop_requested = True
        log.warning("%s received: saving a checkpoint at the next optimizer step, then stopping "
                    "(a second SIGINT aborts at once)", name)



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


__all__ = ["CheckpointError", "CheckpointSettings", "Checkpointer", "RunFacts", "find_checkpoint",
           "list_checkpoints", "read_manifest"]
