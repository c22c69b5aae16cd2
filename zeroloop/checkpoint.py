"""Checkpoints that resume exactly, survive crashes and preemption, and are never half-visible.

The layout on disk stays DeepSpeed's, so its own tools (``zero_to_fp32.py`` included)
work on it::

    <output_dir>/checkpoints/
        latest                         the tag of the newest complete checkpoint
        global_step8/                  one tag folder per checkpoint
            mp_rank_00_model_states.pt ...   DeepSpeed's files (pickles)
            zeroloop_rank_00000.json   this rank's RNG states (JSON)
            zeroloop_manifest.json     written last: the TrainState, config, versions, file sizes

How a save stays atomic (:mod:`zeroloop.saving`): every rank writes under a temporary tag,
all ranks agree that every write worked, then rank 0 writes the manifest, renames the folder
into place and replaces ``latest``. A crash at any moment leaves ``latest`` naming the
previous complete checkpoint; a folder without a manifest (or whose files do not match the
sizes the manifest lists) is never loaded.

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

import logging
import os
import shutil
import signal
from dataclasses import dataclass
from typing import Any, Callable

from . import runtime
from .adam_replay import replay_cpu_adam_bias_corrections
from .config import is_positive_int
from .errors import CheckpointError, ConfigError
from .finding import find_checkpoint, read_checkpoint
from .manifest import (DELETING_SUFFIX, LATEST, MANIFEST, TMP_SUFFIX, list_checkpoints, rank_file, read_checkpoint_json,
                       read_manifest)
from .rank_sync import on_any_rank, on_every_rank
from .resume import ResumePlan, plan_resume, reapply, seed_rank
from .rng import set_rng_state
from .saving import SaveProtocol
from .state import TrainState
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


class Checkpointer(SaveProtocol):
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
            from .export import save_final_weights

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
                                    all_ok=lambda flag: on_every_rank(flag, self.engine.device))

    def _rank_rng(self, tag_dir: str, manifest: dict[str, Any]) -> dict[str, Any]:
        path = os.path.join(tag_dir, rank_file(self.rank))
        rank_state = read_checkpoint_json(path, "cannot be read")
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

    def _agree_on_stop(self) -> bool:
        """True on every rank when any rank was asked to stop (one small all-reduce)."""
        return on_any_rank(self._stop_requested, self.engine.device)

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


__all__ = ["CheckpointError", "CheckpointSettings", "Checkpointer", "LATEST", "MANIFEST", "RunFacts",
           "find_checkpoint", "list_checkpoints", "rank_file", "read_manifest"]
