"""How a checkpoint is saved so that it is never half-visible: the save protocol.

Every rank writes under a temporary tag (``global_step8.tmp``), all ranks fsync their files
and agree that every write worked (a failed write on any rank fails the save on all of them,
see :meth:`SaveProtocol._agree`), then rank 0 writes the manifest, renames the folder into
place and replaces ``latest`` through a temporary file and ``os.replace``, with an fsync of
each directory it changed; then it prunes to the newest ``keep``. The file operations this
needs (fsync, durable JSON, ``latest``) are here too. :class:`~zeroloop.checkpoint.Checkpointer`
is the user's entry point; it saves through :class:`SaveProtocol`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from typing import Any, Callable, Iterator

import torch

from .errors import CheckpointError
from .manifest import (DELETING_SUFFIX, FORMAT, LATEST, MANIFEST, RANK_FILE, TMP_SUFFIX, list_checkpoints, rank_file,
                       read_latest, universal_sibling)
from .pretrained import save_pretrained_configs
from .rng import rng_state
from .version import __version__

log = logging.getLogger("zeroloop")


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




# --- the protocol ----------------------------------------------------------------------------------


class SaveProtocol:
    """The save side of :class:`~zeroloop.checkpoint.Checkpointer`: temporary tag, agreement
    between ranks, rename, ``latest``, keep-K pruning.

    It uses the checkpointer's ``engine``, ``state``, ``facts``, ``settings``, ``folder``,
    ``rank``, ``world_size``, ``node_local``, ``resumed_from``, ``_keeps_folder`` and
    ``_folder_sharers``.
    """

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
