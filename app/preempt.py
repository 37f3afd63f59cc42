"""Turning "stop" signals into checkpoints: which signals mean it, and a launcher that survives them.

Open MPI 5's mpirun answers SIGTERM (what ``scancel``, ``qdel`` and preemption deliver) by killing
the ranks about 0.5 s later, whatever they do with it, and exiting 1: far too soon to write a
ResNet-50 checkpoint, and no MCA parameter lengthens it. ``run_launcher`` therefore starts the
launcher with SIGTERM blocked (a blocked signal stays pending, so its own handler never runs; the
ranks it starts get an empty mask) and, from its own process, turns each TERM it receives into the
USR1 that mpirun and srun pass on unchanged. Stdlib only: it stays resident for the whole job.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Sequence
from types import FrameType

from app.errors import LaunchError

#: Signals after which every rank checkpoints and exits with 85: USR1 (walltime warnings), TERM
#: (scancel, qdel on PBS, preemption) and USR2 (Grid Engine's ``-notify`` warning before qdel kills).
STOP_SIGNALS = frozenset({signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2})

#: Passed on unchanged, so that Ctrl-C or a hang-up stops the launcher as it would without us.
_PASSED = frozenset({signal.SIGINT, signal.SIGHUP})


def leave_stop_signals_to_the_rank(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore the stop signals. scancel signals every process
    of the job, and torch makes a worker die of TERM, which fails its rank before it can checkpoint;
    the rank stops its workers itself once it has saved."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class _Relay:
    """Signal handler: stop signals go on to the launcher as USR1, the others unchanged; any that
    arrive before the launcher exists are kept and passed on once it does."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.early: list[int] = []

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        if self.child is None:
            self.early.append(signum)
        else:  # a no-op once the launcher has exited
            self.child.send_signal(signal.SIGUSR1 if signum in STOP_SIGNALS else signum)


def run_launcher(argv: Sequence[str]) -> int:
    """Run ``argv`` (e.g. ``mpirun -np 4 spngd train ...``) with SIGTERM kept from it; return its
    exit status (128 + N when a signal N ended it, as a shell reports it)."""
    if not argv:
        raise LaunchError("spngd launch needs a command, e.g. spngd launch mpirun -np 2 spngd train ...")
    relay = _Relay()
    previous = {sig: signal.signal(sig, relay) for sig in STOP_SIGNALS | _PASSED}
    try:
        outer = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # inherited by the launcher
        try:
            relay.child = subprocess.Popen(list(argv))
        except OSError as exc:
            raise LaunchError(f"cannot start {argv[0]!r}: {exc.strerror}") from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, outer)  # a TERM that came meanwhile arrives now
        for signum in relay.early:
            relay(signum, None)
        status = relay.child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status if status >= 0 else 128 - status
