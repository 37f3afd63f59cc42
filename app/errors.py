"""The error types every layer may raise, at the ground floor so that any module can import them.

``UserError`` is a problem the user can fix (bad input, bad environment): its message is ONE line,
every rank sees the same input and so raises the same error, and the CLI prints it once (rank 0)
and exits with ``USAGE_EXIT``. Anything else is a failure of one rank (see ``app.launch``).

The subclasses say which layer found the problem; each keeps the builtin base it always had, so
``except ValueError`` around a parser or a checkpoint reader catches exactly what it did before.
This module imports nothing of the project's: importing it can never form a cycle.
"""

from __future__ import annotations

USAGE_EXIT = 2
"""The exit code of a job that ended on a ``UserError``."""


class UserError(Exception):
    """A problem in the user's input or environment; the message is one line."""


class ConfigError(UserError, ValueError):
    """A bad configuration value or file."""


class DataError(UserError, ValueError):
    """A dataset problem the user must fix."""


class LaunchError(UserError, RuntimeError):
    """The job's environment does not describe a usable launch."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that was asked for explicitly cannot be used."""


class DiskFullError(OSError):
    """A file could not be written because its file system (or the user's quota) is full.

    Not a UserError: only the writing rank sees it, so it ends the job as a rank failure (exit 1)."""


class Diverged(Exception):
    """Training stopped because the model broke: a non-finite or exploded loss (``train.divergence_factor``)
    or a K-FAC layer past ``kfac.max_bad_refreshes``; the message is one line. Every rank raises it at the
    same step (they decide on shared values), before any checkpoint of that step; the CLI prints it once
    and exits with ``checkpoint.DIVERGED_EXIT``."""
