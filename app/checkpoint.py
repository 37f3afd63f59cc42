"""Atomic, verifiable checkpoints and automatic resume.

A job can be killed at any instant (walltime, preemption, node failure), so a checkpoint is
written to a temporary file, fsynced, renamed into place, and only then given a SHA-256 sidecar.
A checkpoint counts as complete only when its sidecar matches; a truncated or corrupt file is
refused with one warning and the previous complete one is used instead.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
import signal
from pathlib import Path
from typing import Any

import torch

from app.errors import CheckpointError
from app.preempt import STOP_SIGNALS
from app.storage import full_disk_as_error, write_atomic

log = logging.getLogger(__name__)

#: Exit code after a signal-triggered checkpoint; job scripts requeue or chain on it.
REQUEUE_EXIT = 85
#: Exit code when training stopped because the model broke (diverged loss, a K-FAC layer past
#: kfac.max_bad_refreshes); no checkpoint of the broken state is written, so the newest one is good.
DIVERGED_EXIT = 3

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


class Checkpointer:
    """Saves and finds checkpoints in ``<run_dir>/checkpoints``; only rank 0 writes."""

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write ``ckpt-<step>.pt`` and its sidecar; on failure neither is left and older ones are untouched."""
        with full_disk_as_error(self.dir):
            self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".ckpt-*.tmp*"):  # left by a killed writer; only rank 0 writes here
            stale.unlink(missing_ok=True)
        path = self.dir / f"ckpt-{step:08d}.pt"
        write_atomic(path, lambda f: torch.save(state, f))
        try:
            digest = _sha256(path)
            write_atomic(_sidecar(path), lambda f: f.write(digest.encode()))
        except BaseException:
            path.unlink(missing_ok=True)  # without its sidecar it would only be skipped as incomplete
            raise
        self._prune()
        return path

    def _all(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted((p for p in self.dir.iterdir() if _NAME.match(p.name)), reverse=True)

    def _prune(self) -> None:
        for old in self._all()[self.keep:]:
            old.unlink(missing_ok=True)
            _sidecar(old).unlink(missing_ok=True)

    def load_latest(self) -> tuple[dict[str, Any], Path] | None:
        """The newest complete checkpoint, skipping (with a warning) any that fail verification."""
        for path in self._all():
            try:
                return load(path), path
            except CheckpointError as exc:
                log.warning("%s; trying an older checkpoint", exc)
        return None


def load(path: Path) -> dict[str, Any]:
    """Load one checkpoint after checking its digest; weights_only so a file cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete or not written by spngd (no {sidecar.name} "
                              "next to it)")
    if sidecar.read_text(errors="replace").strip() != _sha256(path):
        raise CheckpointError(f"checkpoint {path} is corrupt (SHA-256 mismatch)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's text here advises weights_only=False, i.e. running its code
        raise CheckpointError(f"checkpoint {path} cannot be read safely (it is not a weights-only checkpoint "
                              "written by spngd)") from None
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"checkpoint {path} cannot be read: {first}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} was not written by spngd (it holds a {type(state).__name__})")
    return state


class StopSignal:
    """Remembers SIGUSR1/SIGTERM/SIGUSR2 so the loop can checkpoint at the next step boundary.

    Handlers only set a flag: the ranks then agree (one tiny allreduce per step) so all of them
    save and exit together, whichever rank the scheduler signalled. The signals are also unblocked:
    ``spngd launch`` starts the launcher with TERM blocked, and a launcher that does not reset the
    mask (as Open MPI's does) would otherwise hand a rank that can never see scancel's TERM.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._mask: set[int | signal.Signals] | None = None

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signum

    def uninstall(self) -> None:
        if self._mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            self._mask = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
