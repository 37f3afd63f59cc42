"""Input pipelines: sharding, resume, bad images, dataset errors, the embedded MNIST, synthetic data.

Datasets are a few 8x8 images of one flat colour each: crops and resizes keep a flat image flat,
so every output image tells which file it came from, whatever the augmentation did.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import gzip
import importlib.util
import logging
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi_helpers import REPO, run_mpi, skip_unless_runnable
from PIL import Image

from app.config import Config, load
from app.data import PAD, DataError, build_loaders, bundled
from app.data.bundled import export, mnist5k_csv
from app.data.common import MEAN_255, STD_255, ShardPlan
from app.metrics import parse_final_line

CPU = torch.device("cpu")


def _has_dali() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:
        return False


DALI = pytest.param("dali", marks=[pytest.mark.dali, pytest.mark.skipif(
    not _has_dali(), reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda120==2.4.0)")])
BACKENDS = ["torch", DALI]


def _colour(k: int) -> tuple[int, int, int]:
    return 40 + 5 * (k % 40), 40 + 5 * (k // 40), 128


def _identify(images: torch.Tensor) -> list[int]:
    """Dataset index of each flat-coloured image (inverse of ``_colour`` after normalisation)."""
    mean, std = torch.tensor(MEAN_255[:2]), torch.tensor(STD_255[:2])
    rg = images[:, :2, 2:-2, 2:-2].mean(dim=(2, 3)).cpu() * std + mean
    k = ((rg - 40) / 5).round().long()
    return (k[:, 0] + 40 * k[:, 1]).tolist()


def make_dataset(root: Path, train: dict[str, int], val: dict[str, int], noise: bool = False) -> Path:
    """``root/{train,val}/<class>/<i>.png``; flat colour = index in the split's sorted order."""
    rng = np.random.default_rng(0)
    for split, counts in (("train", train), ("val", val)):
        k = 0
        for cls in sorted(counts):
            (root / split / cls).mkdir(parents=True)
            for i in range(counts[cls]):
                pixels = (rng.integers(0, 256, (12, 10, 3)) if noise
                          else np.broadcast_to(_colour(k), (8, 8, 3))).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i:03d}.png")
                k += 1
    return root


def config(root: Path | str, backend: str, **data: object) -> Config:
    values = {"path": str(root), "backend": backend, "image_size": 8, "val_resize": 8, "batch_size": 2,
              "workers": 0} | data
    return load(None, [f"data.{k}={v}" for k, v in values.items()])


@pytest.fixture(scope="module")
def flat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """23 train / 11 val images in 3 classes: no size divides evenly by ranks x batch."""
    return make_dataset(tmp_path_factory.mktemp("flat"), {"a": 7, "b": 8, "c": 8}, {"a": 3, "b": 4, "c": 4})


def labels_of(root: Path, split: str) -> list[int]:
    classes = sorted(p.name for p in (root / split).iterdir())
    return [c for c, name in enumerate(classes) for _ in sorted((root / split / name).iterdir())]


# --- the plan ---------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_plan_train_disjoint_full_batches_and_reshuffled(size: int) -> None:
    plans = [ShardPlan(23, 2, rank, size, seed=5, train=True) for rank in range(size)]
    assert len({len(p) for p in plans}) == 1
    for epoch in (0, 1):
        taken = np.concatenate([p.indices(epoch) for p in plans])
        assert len(taken) == len(set(taken.tolist())) == len(plans[0]) * 2 * size  # no overlap
        assert 23 - len(taken) < 2 * size  # only the global remainder is dropped
        assert all(np.array_equal(p.order(epoch), plans[0].order(epoch)) for p in plans)
    assert not np.array_equal(plans[0].order(0), plans[0].order(1))


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_plan_val_every_image_once_padded_to_equal_batches(size: int) -> None:
    plans = [ShardPlan(11, 4, rank, size, seed=5, train=False) for rank in range(size)]
    assert len({len(p) for p in plans}) == 1
    taken = np.concatenate([p.indices(0) for p in plans])
    assert sorted(taken[taken != PAD].tolist()) == list(range(11))


# --- loaders (torch and DALI) -------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_sharding_covers_every_image_once(flat: Path, backend: str, size: int) -> None:
    train_labels, val_labels = labels_of(flat, "train"), labels_of(flat, "val")
    seen: dict[str, list[int]] = {"train": [], "val": []}
    lengths = set()
    for rank in range(size):
        train, val, info = build_loaders(config(flat, backend), rank, size, CPU, seed=3)
        assert (info.train_size, info.val_size, info.classes) == (23, 11, ("a", "b", "c"))
        for name, loader, truth in (("train", train, train_labels), ("val", val, val_labels)):
            batches = list(loader.epoch(0))
            assert len(batches) == len(loader)
            lengths.add((name, len(loader)))
            for images, labels in batches:
                assert images.shape == (2, 3, 8, 8) and images.dtype == torch.float32
                assert labels.dtype == torch.int64
                for k, label in zip(_identify(images), labels.tolist(), strict=True):
                    if label != PAD:
                        assert label == truth[k]
                        seen[name].append(k)
    assert len(lengths) == 2  # one train and one val length, shared by all ranks
    assert len(seen["train"]) == len(set(seen["train"])) == 23 // (2 * size) * 2 * size
    assert sorted(seen["val"]) == list(range(11))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reshuffled_each_epoch_same_on_rerun(flat: Path, backend: str) -> None:
    train, _, _ = build_loaders(config(flat, backend), 0, 1, CPU, seed=3)

    def ids(epoch: int) -> list[int]:
        return [k for images, _ in train.epoch(epoch) for k in _identify(images)]

    assert ids(0) != ids(1) and ids(1) == ids(1)


@pytest.mark.dali
@pytest.mark.skipif(not _has_dali(), reason="NVIDIA DALI is not installed")
def test_dali_reads_what_torch_reads(flat: Path) -> None:
    def ids(backend: str) -> list[list[int]]:
        train, val, _ = build_loaders(config(flat, backend), 1, 2, CPU, seed=3)
        return [[k for x, y in loader.epoch(4) for k, label in zip(_identify(x), y.tolist(), strict=True)
                 if label != PAD] for loader in (train, val)]

    assert ids("dali") == ids("torch")


def test_torch_resume_is_bit_identical_with_any_worker_count(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, {"a": 6, "b": 6}, {"a": 2, "b": 2}, noise=True)
    full = list(build_loaders(config(root, "torch"), 0, 1, CPU, seed=9)[0].epoch(1))
    train, _, _ = build_loaders(config(root, "torch", workers=2), 0, 1, CPU, seed=9)
    next(train.epoch(0))  # an abandoned epoch must not leak into the next one
    tail = list(train.epoch(1, start_batch=2))
    assert len(full) == 6 and len(tail) == 4
    for (x, y), (x2, y2) in zip(full[2:], tail, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert list(train.epoch(1, start_batch=6)) == []
    with pytest.raises(ValueError, match="start_batch"):
        train.epoch(1, start_batch=7)


@pytest.mark.dali
@pytest.mark.skipif(not _has_dali(), reason="NVIDIA DALI is not installed")
def test_dali_resume_reads_the_same_images(flat: Path) -> None:
    train, _, _ = build_loaders(config(flat, "dali"), 0, 1, CPU, seed=9)
    full = [(_identify(x), y.tolist()) for x, y in train.epoch(2)]
    assert [(_identify(x), y.tolist()) for x, y in train.epoch(2, start_batch=4)] == full[4:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_images_are_skipped_counted_and_warned_once(tmp_path: Path, backend: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    root = make_dataset(tmp_path, {"a": 3, "b": 2}, {"a": 2, "b": 2})
    buf = tmp_path / "good.jpg"
    Image.fromarray(np.full((16, 16, 3), 99, np.uint8)).save(buf, quality=95)
    data = buf.read_bytes()
    (root / "train/a/trunc.jpg").write_bytes(data[: len(data) // 2])
    (root / "train/b/empty.jpg").write_bytes(b"")
    (root / "train/b/junk.png").write_bytes(b"not an image at all" * 10)
    (root / "val/b/trunc.jpg").write_bytes(data[: len(data) // 2])  # 8 train (all used), 5 val
    workers = 2 if backend == "torch" else 1
    train, val, _ = build_loaders(config(root, backend, workers=workers), 0, 1, CPU, seed=1)
    with caplog.at_level(logging.WARNING, logger="app.data"):
        for epoch in (0, 1):
            assert all(x.shape == (2, 3, 8, 8) for x, _ in train.epoch(epoch))
        scored = sum(int((y != PAD).sum()) for _, y in val.epoch(0))
    assert train.skipped == 6 and val.skipped == 1  # every occurrence counts, 2 epochs x 3 files
    assert scored == 4  # the unreadable val image is not scored
    warned = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(warned) == 4 and all("\n" not in w for w in warned)  # one line per bad file


def _add_non_files(folder: Path) -> None:
    """Image-named entries that are not files: a symlink loop (2 entries), a dangling link, a
    directory and a FIFO (which would block a reader that opened it). Root can read a chmod-000
    file, so these and corrupt files are the unreadable kinds a test running as root can make."""
    os.symlink("loop2.jpg", folder / "loop1.jpg")
    os.symlink("loop1.jpg", folder / "loop2.jpg")
    os.symlink("nowhere.jpg", folder / "dangling.jpg")
    (folder / "dir.jpg").mkdir()
    os.mkfifo(folder / "fifo.jpg")


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_files_and_dead_classes_are_skipped_counted_and_warned(tmp_path: Path, backend: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    root = make_dataset(tmp_path, {"a": 3, "b": 2, "c": 0}, {"a": 1, "b": 1, "c": 1})
    _add_non_files(root / "train/a")  # 5 of a's 8 entries
    for name in ("x.jpg", "y.jpg"):  # class c: every file corrupt, found only by decoding
        (root / "train/c" / name).write_bytes(b"\xff\xd8 not a jpeg")
    os.symlink("gone.png", root / "val/b/dangling.png")
    train, val, info = build_loaders(config(root, backend), 0, 1, CPU, seed=1)
    assert (info.train_size, info.val_size) == (12, 4)  # non-files keep their slot: the plan ignores them
    with caplog.at_level(logging.WARNING, logger="app.data"):
        for epoch in (0, 1):
            for x, y in train.epoch(epoch):
                assert x.shape == (2, 3, 8, 8) and set(y.tolist()) <= {0, 1}  # no image of class c
        scored = sum(int((y != PAD).sum()) for _, y in val.epoch(0))
    assert train.skipped == 2 * 7 and val.skipped == 1  # every used slot of a bad entry, each epoch
    assert scored == 3
    files = _warnings(caplog, "skipping unreadable image")
    assert len(files) == 8  # once per bad entry, not per epoch
    for name, reason in (("loop1.jpg", "symlink loop"), ("dangling.jpg", "dangling symlink"),
                         ("dir.jpg", "a directory"), ("fifo.jpg", "a FIFO")):
        assert any(name in w and reason in w for w in files), (name, files)
    dead = _warnings(caplog, "has no readable image")
    assert len(dead) == 1 and "class 'c'" in dead[0] and "train" in dead[0], dead


def test_class_of_only_non_files_is_refused_at_scan(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, {"a": 2, "b": 0}, {"a": 1, "b": 1})
    _add_non_files(root / "train/b")
    message = _error(root)
    assert f"'{root / 'train/b'}' holds no readable image" in message and "all 5 entries" in message


@pytest.mark.mpi
def test_skips_of_every_rank_are_summed_in_metrics_and_final_line(tmp_path: Path) -> None:
    """2 ranks: val is dealt round-robin in file order, so rank 0 meets val/a/000 and rank 1
    val/a/001; train's 3 bad entries are shuffled over both ranks. One rank's count would be short."""
    skip_unless_runnable()
    root = make_dataset(tmp_path / "ds", {"a": 6, "b": 5}, {"a": 2, "b": 2})
    for name in ("train/a/000.png", "val/a/000.png"):
        (root / name).write_bytes(b"corrupt")
    os.symlink("loop.png", root / "train/b/loop.png")
    (root / "train/b/001.png").unlink()
    os.symlink("001.png", root / "train/b/001.png")  # a self loop where a good image was
    (root / "val/a/001.png").unlink()
    (root / "val/a/001.png").mkdir()
    rc, out = run_mpi(2, Path(sys.executable).parent / "spngd", "train", "--config", str(REPO / "configs/smoke.yaml"),
                      *(f"--set={kv}" for kv in (f"data.path={root}", "data.image_size=8", "data.val_resize=8",
                                                 "data.batch_size=2", "data.workers=0", "train.max_steps=0",
                                                 "train.epochs=2", "train.val_every=1", "train.log_every=1",
                                                 f"output.dir={tmp_path}", "output.name=run", "output.plot=false")),
                      timeout=240)
    assert rc == 0, out
    with (tmp_path / "run/metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    train_rows, val_rows = [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "val"]
    assert len(train_rows) == 6 and len(val_rows) == 2, rows  # 12 entries / (2 ranks x 2) = 3 steps per epoch
    assert int(train_rows[-1]["skipped_images"]) == 2 * 3  # 3 bad entries, all used, 2 epochs
    assert [int(r["skipped_images"]) for r in val_rows] == [2, 4]  # cumulative over validations
    finals = [parse_final_line(line) for line in out.splitlines() if line.startswith("FINAL ")]
    assert len(finals) == 1 and finals[0]["skipped_images"] == 6 + 4, out


# --- dataset errors -----------------------------------------------------------------------------

def _error(root: Path | str, backend: str = "torch") -> str:
    with pytest.raises(DataError) as exc:
        build_loaders(config(root, backend), 0, 1, CPU, seed=0)
    message = str(exc.value)
    assert "\n" not in message and message.startswith("data: ")
    return message


def test_dataset_errors_are_one_clear_line(tmp_path: Path) -> None:
    assert "does not exist" in _error(tmp_path / "nope")
    make_dataset(tmp_path / "noval", {"a": 2}, {})
    assert "no val/ folder" in _error(tmp_path / "noval")
    make_dataset(tmp_path / "empty", {"a": 2, "b": 2}, {"a": 1, "b": 1})
    (tmp_path / "empty/train/c").mkdir()
    (tmp_path / "empty/val/c").mkdir()
    (tmp_path / "empty/val/c/notes.txt").write_text("not an image")
    assert "'" + str(tmp_path / "empty/train/c") + "' holds no" in _error(tmp_path / "empty")
    make_dataset(tmp_path / "differ", {"a": 2, "b": 2, "x": 1}, {"a": 1, "b": 1, "y": 1})
    assert "only in train: x; only in val: y" in _error(tmp_path / "differ")
    make_dataset(tmp_path / "small", {"a": 1}, {"a": 1})
    assert "cannot fill one global batch" in _error(tmp_path / "small")


def test_missing_dali_says_how_to_install(flat: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    assert "pip install nvidia-dali-cuda120==2.4.0" in _error(flat, "dali")


# --- embedded MNIST -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two exporters race for the same folder, as ranks starting together would."""
    parent = tmp_path_factory.mktemp("bundled") / "data"
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(export("mnist5k", parent))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [parent / "mnist5k"] * 2
    return parent


def test_bundled_export_layout_and_labels(mnist_parent: Path) -> None:
    assert sorted(p.name for p in mnist_parent.iterdir()) == [".mnist5k.lock", "mnist5k"]  # no temp left
    with gzip.open(mnist5k_csv(), "rt") as csv:
        rows = np.loadtxt(csv, delimiter=",", dtype=np.int64)
    files = sorted((mnist_parent / "mnist5k").glob("*/*/*.jpg"))
    assert len(files) == 5000
    assert sum(f.parts[-3] == "val" for f in files) == 1000
    assert sorted(int(f.stem) for f in files) == list(range(5000))
    for f in files:
        assert int(f.parts[-2]) == rows[int(f.stem), 784]
    for f in files[::500]:
        image = np.asarray(Image.open(f))
        assert image.shape == (28, 28, 3)
        assert np.abs(image[..., 0].astype(np.int64) - rows[int(f.stem), :784].reshape(28, 28)).mean() < 4
    for split, per_digit in (("train", 400), ("val", 100)):
        folders = [mnist_parent / "mnist5k" / split / str(d) for d in range(10)]
        assert all(len(list(folder.iterdir())) == per_digit for folder in folders)


def test_export_without_flock_still_ends_with_one_copy(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def slow_writer(out: Path) -> None:
        (out / "train").mkdir()
        time.sleep(0.2)  # both writers are inside at once
        (out / "train" / threading.current_thread().name).touch()

    def no_flock(fd: object, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setitem(bundled._EXPORTERS, "fake", slow_writer)
    monkeypatch.setattr(fcntl, "flock", no_flock)
    threads = [threading.Thread(target=export, args=("fake", tmp_path), name=f"w{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fake.lock", "fake"]
    assert len(list((tmp_path / "fake" / "train").iterdir())) == 1  # one writer's complete copy


def test_empty_path_uses_bundled_mnist(mnist_parent: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(mnist_parent.parent)
    stamp = (mnist_parent / "mnist5k").stat().st_mtime_ns
    train, val, info = build_loaders(config("", "torch", batch_size=32), 1, 4, CPU, seed=0)
    assert (info.num_classes, info.train_size, info.val_size) == (10, 4000, 1000)
    assert info.root == Path("data/mnist5k") and (mnist_parent / "mnist5k").stat().st_mtime_ns == stamp
    assert (len(train), len(val)) == (31, 8)


# --- synthetic ----------------------------------------------------------------------------------

def test_synthetic_shapes_and_lengths() -> None:
    cfg = load(None, ["data.backend=synthetic", "data.image_size=16", "data.batch_size=4",
                      "data.synthetic_classes=7", "data.synthetic_samples=50"])
    train, val, info = build_loaders(cfg, 1, 3, CPU, seed=0)
    assert (len(train), len(val), info.num_classes, info.root) == (4, 4, 7, None)
    batches = list(train.epoch(0))
    x, y = batches[0]
    assert len(batches) == 4 and len(list(train.epoch(0, start_batch=3))) == 1 and train.skipped == 0
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and x.device == CPU
    assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) < 7
