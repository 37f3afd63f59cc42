"""Writing run outputs so that a full disk costs one clear line and nothing already on disk.

Every artefact (config.yaml, plot.png, checkpoints and their sidecars) is written to a temporary
file next to its destination and renamed into place only when complete, so a failed write leaves
the previous version intact and no 0-byte or partial file behind. A full disk or quota (ENOSPC,
EDQUOT, EFBIG) becomes a ``DiskFullError`` naming the file and the free space: an environment
failure of the writing rank, which ends the job with exit 1 like any rank failure.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, cast

from app.errors import DiskFullError

_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest parent that exists (absolute)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_full(path: Path, exc: OSError) -> DiskFullError:
    """``exc`` (a full-disk error while writing ``path``) as one line naming the file and the free space."""
    where = existing_ancestor(path.parent)
    try:
        usage = shutil.disk_usage(where)
        free = f"{_size(usage.free)} free of {_size(usage.total)} on {where}"
    except OSError:
        free = f"free space of {where} unknown"
    error = DiskFullError(f"cannot write {path}: {exc.strerror} ({free})")
    error.errno = exc.errno
    return error


@contextmanager
def full_disk_as_error(path: Path) -> Iterator[None]:
    """Turn a full-disk OSError raised while writing ``path`` into a DiskFullError."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as exc:
        if exc.errno in _FULL:
            raise disk_full(path, exc) from None
        raise


class _Recorder:
    """A write-only file wrapper that remembers the OSError of a failed write: torch.save reports a
    short write as a RuntimeError ("unexpected pos ...") that no longer says the disk is full."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self._f.flush()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary sibling, fsync it, rename it into place.

    On any failure the temporary file is removed and ``path`` keeps its previous content.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with full_disk_as_error(path):  # outermost: the free space is measured after the cleanup
        recorder: _Recorder | None = None
        try:
            with tmp.open("wb") as f:
                recorder = _Recorder(f)
                write(cast(BinaryIO, recorder))  # write and flush: all that serialisers call
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, Exception) and recorder is not None and recorder.error is not None:
                raise recorder.error from None
            raise
        _fsync_dir(path.parent)
