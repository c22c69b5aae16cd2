"""Every error zeroloop raises on purpose, under one base.

``except zeroloop.ZeroloopError`` catches them all; each also subclasses the builtin that
callers already catch for its kind, so code written against the builtin keeps working:

- :class:`ConfigError` (``ValueError``): a config, an argument or a settings object is wrong;
  all of its problems are listed at once, each naming the key and the fix.
- :class:`CheckpointError` (``RuntimeError`` and ``ValueError``): a checkpoint cannot be
  saved, resumed from, converted or consolidated; the message names the file and the fix.
  It is a ``ValueError`` too because consolidation raised one before the two were unified.
  :class:`CheckpointNotFoundError` (also ``FileNotFoundError``) when a file or folder is missing.
- :class:`NumericalHealthError` (``RuntimeError``): training stopped because its numbers went bad.
- :class:`RankFailure` / :class:`RankTimeout` (``RuntimeError``): a rank of
  :func:`zeroloop.testing.run_ranks` raised, crashed or hung.
"""

from __future__ import annotations


class ZeroloopError(Exception):
    """The base of every error zeroloop raises on purpose."""


class ConfigError(ZeroloopError, ValueError):
    """One or more problems in a DeepSpeed config, the loop's arguments or a settings object,
    all reported together.

    Attributes:
        problems: one line per problem, each naming the key and the fix.
        source: the file the config came from, or ``None`` for a dict.
    """

    def __init__(self, problems: list[str], source: str | None = None, subject: str = "DeepSpeed config"):
        self.problems = list(problems)
        self.source = source
        where = f" ({source})" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        count = len(self.problems)
        super().__init__(f"{subject}{where} has {count} problem{'s' * (count != 1)}:\n{lines}")


class CheckpointError(ZeroloopError, RuntimeError, ValueError):
    """A checkpoint cannot be saved, resumed from, converted or consolidated; the message names
    the file and the fix."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A folder, tag or rank file a checkpoint tool needs does not exist."""


class NumericalHealthError(ZeroloopError, RuntimeError):
    """Training stopped because its numbers went bad; the message says where and what to try."""


class RankFailure(ZeroloopError, RuntimeError):
    """A rank raised, crashed or timed out in :func:`zeroloop.testing.run_ranks`.

    Attributes:
        rank: the first rank that failed.
        remote_traceback: that rank's formatted traceback (or exit description).
    """

    def __init__(self, rank: int, message: str, remote_traceback: str = ""):
        self.rank = rank
        self.remote_traceback = remote_traceback
        super().__init__(f"{message}\n\n--- rank {rank} traceback ---\n{remote_traceback}"
                         if remote_traceback else message)


class RankTimeout(RankFailure):
    """One or more ranks did not finish within the timeout and were killed."""


__all__ = ["CheckpointError", "CheckpointNotFoundError", "ConfigError", "NumericalHealthError", "RankFailure",
           "RankTimeout", "ZeroloopError"]
