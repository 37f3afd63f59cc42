"""One issue order for the collectives that autograd hooks start, shared by every rank.

Why: a backend pairs the operations of a communicator across ranks by the order each rank issues
them (torch.distributed, NCCL) or by a per-communicator name sequence (Horovod), and a rank runs a
communicator's operations in its issue order. Gradient buckets and K-FAC factor buckets become
ready in backward hooks, whose firing order is the graph's and may differ between ranks (a layer
with no gradient on one rank, a loss path that differs, a hook of one micro-batch that is late).
Issued as they become ready, two ranks would pair a gradient allreduce with a factor
reduce-scatter; kept on two communicators, NCCL only guarantees progress when every rank issues
the concurrent communicators' operations in the same order, which nothing ensured. So both go
through this queue on the one world communicator: each operation is registered under a ``Key``
every rank computes alike, and the queue issues them in key order only, each as soon as it and
every operation before it are ready. Every rank then issues the same sequence, whatever order its
hooks fired in.

Cost: a ready operation waits while an operation with an earlier key is not ready. Keys follow the
order backward usually makes them ready (``launch_key``), so the wait is rare and short; ``flush``
at the end of backward issues the rest in order, forcing those that never became ready.

Rounds: one step's operations form a round. A *standing* source (the gradient averager) takes part
in every round under the same keys; other sources add their operations to one round (the factor
exchange, planned when the step begins, before any hook of the round fires). A round opens when a
source registers or readies an operation and ends when nothing of it is pending. A collective
issued directly, not through the queue, must be issued where every rank is between rounds (the
decisions allreduce after the exchange's results, metrics, checkpoints): then it cannot interleave.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

Key = tuple[int, int, int, int]  # (phase, -position, source, index): see ``launch_key``

GRADIENTS, FACTORS = 0, 1  # sources; on a tie of phase and position the gradients go first
EARLY, BACKWARD = 0, 1  # phases: ready before the user's backward (sampled-label factors), or during it


def launch_key(phase: int, position: int, source: int, index: int) -> Key:
    """The key of an operation that waits for the parameters whose smallest registration position
    (``param_positions``) is ``position``: backward reaches small positions last, so a larger one
    is issued first. ``index`` orders a source's operations at the same phase and position."""
    return (phase, -position, source, index)


def param_positions(model: nn.Module) -> dict[nn.Parameter, int]:
    """Each parameter's registration position in ``model``: the same on every rank."""
    return {p: i for i, p in enumerate(model.parameters())}


@dataclass
class _Item:
    launch: Callable[[], None]
    force: Callable[[], None] | None  # makes the operation ready when the round must end (None: issue as is)
    ready: bool = False


class Standing:
    """A source that takes part in every round with the same operations (see ``LaunchQueue.attach``)."""

    def __init__(self, queue: LaunchQueue, launches: dict[Key, Callable[[], None]]) -> None:
        self.queue = queue
        self.launches = launches

    def detach(self) -> None:
        """Take no part in rounds that open from now on."""
        if self in self.queue._standing:
            self.queue._standing.remove(self)


class LaunchQueue:
    """The issue order of one communicator's hook-started collectives (see the module docstring)."""

    def __init__(self) -> None:
        self._standing: list[Standing] = []
        self._pending: dict[Key, _Item] = {}
        self._last: Key | None = None  # the last key issued in the open round
        self._issuing = False

    @property
    def idle(self) -> bool:
        """No round is open: a collective issued directly now cannot interleave with queued ones."""
        return not self._pending

    def attach(self, launches: dict[Key, Callable[[], None]]) -> Standing:
        """Register a standing source: ``launches`` (key -> issue the operation) joins every round."""
        if not self.idle:
            raise RuntimeError("launch order: a standing source attached while a round is open")
        standing = Standing(self, dict(launches))
        self._standing.append(standing)
        return standing

    def open(self) -> None:
        """Open a round (its standing operations pending) unless one is open."""
        if self.idle:
            self._last = None
            for standing in self._standing:
                for key, launch in standing.launches.items():
                    self._put(key, _Item(launch, None))

    def add(self, key: Key, launch: Callable[[], None], force: Callable[[], None] | None = None) -> None:
        """Register one operation of the open round (opening one if none is)."""
        self.open()
        self._put(key, _Item(launch, force))

    def ready(self, key: Key) -> None:
        """The operation under ``key`` can go: issue it and the ready ones after it, in key order."""
        self.open()
        item = self._pending.get(key)
        if item is None:
            raise RuntimeError(f"launch order: operation {key} is not pending in this round")
        item.ready = True
        self._pump()

    def flush(self) -> None:
        """End the round: issue everything pending in key order, forcing what is not ready."""
        while self._pending:
            key = min(self._pending)
            item = self._pending[key]
            if not item.ready and item.force is not None:
                item.force()  # usually readies the item, which issues it
            if key in self._pending:
                item.ready = True
                self._pump()

    def _put(self, key: Key, item: _Item) -> None:
        if key in self._pending:
            raise RuntimeError(f"launch order: operation {key} registered twice in one round")
        if self._last is not None and key < self._last:
            raise RuntimeError(f"launch order: operation {key} registered after {self._last} was issued; "
                               "register a round's operations before its first is issued")
        self._pending[key] = item

    def _pump(self) -> None:
        if self._issuing:  # readied from inside an issue: the running loop takes it
            return
        self._issuing = True
        try:
            while self._pending:
                key = min(self._pending)
                item = self._pending[key]
                if not item.ready:
                    break
                del self._pending[key]
                self._last = key
                item.launch()
        finally:
            self._issuing = False
