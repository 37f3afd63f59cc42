"""Collective communication: one ``Comm`` interface over torch.distributed or Horovod.

Create the world communicator with ``app.launch.init_comm``; average data-parallel gradients with
``app.comm.grad_sync.GradientAverager``.
"""

from app.comm.base import ByteCounters, Comm, CommError, Count, Handle, Op

__all__ = ["ByteCounters", "Comm", "CommError", "Count", "Handle", "Op"]
