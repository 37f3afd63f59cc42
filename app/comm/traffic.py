"""What one collective moves through one rank's buffers, as pure functions of the sizes.

The torch backend (nccl, gloo) counts every call with these functions, and ``spngd plan`` sizes
runs of any rank count with the same functions, so the plan and the counters cannot disagree.

Per rank and call:

* ``sent``: bytes of the send buffers this rank hands to the library, padding included;
* ``received``: bytes the library writes into receive buffers this rank allocated for the call,
  padding and metadata (exchanged lengths) included;
* ``data``: the part of ``received`` that is other ranks' real payload;
* ``calls``: library calls the operation takes on this rank.

They are buffer figures, not wire figures: a ring or tree also forwards other ranks' data, a
backend-dependent multiple that no buffer holds. Algorithms (torch backend):

* **allreduce**: one fused in-place call; the buffer is the input.
* **broadcast**: in place.
* **allgather** of parts of uneven length: one broadcast per non-empty part, from its rank, into
  a buffer of exactly that part: no rank allocates ``size x longest``. When the caller does not
  pass the lengths, they are allgathered first (8 bytes per rank).
* **reduce_scatter** into uneven segments: one reduce per non-empty segment, to its owner (equal
  segments: one reduce_scatter call). torch's own uneven reduce_scatter on nccl issues one reduce
  per rank, empty or not (pytorch#82924): 1,024 calls per bucket at 1,024 ranks; here it is the
  number of owners in the bucket.
* **gather** to one root: the root receives each non-empty part in a buffer of its size
  (point-to-point); the lengths are gathered first when not passed (8 bytes per rank, to the root).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

LENGTH_BYTES = 8  # one int64 per rank when lengths travel


@dataclass(frozen=True)
class Traffic:
    sent: int = 0
    received: int = 0
    data: int = 0
    calls: int = 1

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.sent + other.sent, self.received + other.received, self.data + other.data,
                       self.calls + other.calls)


def allreduce(nbytes: int) -> Traffic:
    return Traffic(sent=nbytes, received=nbytes, data=nbytes)


def broadcast(nbytes: int, is_root: bool) -> Traffic:
    return Traffic(sent=nbytes) if is_root else Traffic(received=nbytes, data=nbytes)


def allgather(lengths: Sequence[int], rank: int, row_bytes: int, lengths_known: bool) -> Traffic:
    """Parts of ``lengths[r]`` rows of ``row_bytes`` each; one broadcast per non-empty part."""
    others = sum(n for r, n in enumerate(lengths) if r != rank) * row_bytes
    out = Traffic(sent=lengths[rank] * row_bytes, received=others, data=others,
                  calls=sum(1 for n in lengths if n > 0))
    if not lengths_known:
        out += Traffic(sent=LENGTH_BYTES, received=LENGTH_BYTES * len(lengths))
    return out


def reduce_scatter(sizes: Sequence[int], rank: int, element_bytes: int) -> Traffic:
    """Segment r (``sizes[r]`` elements) reduced onto rank r; this rank sends every segment."""
    calls = 1 if len(set(sizes)) == 1 else sum(1 for n in sizes if n > 0)
    own = sizes[rank] * element_bytes
    return Traffic(sent=sum(sizes) * element_bytes, received=own, data=own, calls=calls)


def gather(lengths: Sequence[int], rank: int, root: int, row_bytes: int, lengths_known: bool) -> Traffic:
    """Every rank's part to ``root`` only."""
    if rank == root:
        others = sum(n for r, n in enumerate(lengths) if r != root) * row_bytes
        out = Traffic(received=others, data=others, calls=sum(1 for r, n in enumerate(lengths) if n > 0 and r != root))
    else:
        out = Traffic(sent=lengths[rank] * row_bytes, calls=1 if lengths[rank] > 0 else 0)
    if not lengths_known:
        out += Traffic(sent=LENGTH_BYTES, received=LENGTH_BYTES * len(lengths) if rank == root else 0)
    return out
