"""The in-memory bundled sets (app/data/tensor.py): the Loader contract on 1 and 2 ranks, the digits split
and normalisation, the Gaussian mixture's determinism and separability, and their config keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.datasets import load_digits  # type: ignore[import-untyped]

from app.config import Config, ConfigError, load
from app.data import PAD, build_loaders, input_shape, tensor
from app.data.tensor import TensorSet

CPU = torch.device("cpu")
GMM = ["data.bundled=gmm", "data.gmm_classes=3", "data.gmm_dim=10", "data.gmm_train=23", "data.gmm_val=11"]


def cfg(*overrides: str) -> Config:
    return load(None, ["data.batch_size=2", *overrides])


def rows(x: torch.Tensor) -> list[tuple[float, ...]]:
    return [tuple(r) for r in x.flatten(1).tolist()]


def index_of(data: TensorSet) -> dict[tuple[float, ...], int]:
    found = {r: i for i, r in enumerate(rows(data.images))}
    assert len(found) == len(data), "every example must be distinct for the tests to identify it"
    return found


# -- the Loader contract ------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize("dataset", ["gmm", "digits"])
def test_shards_are_disjoint_full_and_cover_the_set(size: int, dataset: str) -> None:
    overrides = GMM if dataset == "gmm" else ["data.bundled=digits", "data.batch_size=64"]
    c = cfg(*overrides)
    train_set, val_set = tensor.load(c.data)
    where = {"train": index_of(train_set), "val": index_of(val_set)}
    taken: dict[str, list[int]] = {"train": [], "val": []}
    lengths = set()
    for rank in range(size):
        train, val, info = build_loaders(c, rank, size, CPU, seed=3)
        assert (info.train_size, info.val_size, info.input_shape) == (len(train_set), len(val_set), input_shape(c.data))
        assert info.root is None and train.skipped == val.skipped == 0
        for name, loader, data in (("train", train, train_set), ("val", val, val_set)):
            lengths.add((name, len(loader)))
            batches = list(loader.epoch(0))
            assert len(batches) == len(loader)
            for x, y in batches:
                assert x.shape == (c.data.batch_size, *info.input_shape) and x.dtype == torch.float32
                assert y.dtype == torch.int64 and x.device == CPU
                real = y != PAD
                if name == "train":
                    assert bool(real.all()), "train batches are full"
                else:
                    assert bool((x[~real] == 0).all())
                for r, label in zip(rows(x[real]), y[real].tolist()):
                    i = where[name][r]
                    assert label == int(data.labels[i])
                    taken[name].append(i)
    assert len({n for n, _ in lengths}) == len(lengths) == 2, "the same length on every rank"
    assert len(taken["train"]) == len(set(taken["train"]))
    global_batch = size * c.data.batch_size
    assert len(taken["train"]) == len(train_set) // global_batch * global_batch  # only the remainder dropped
    assert sorted(taken["val"]) == list(range(len(val_set)))  # every val example once


@pytest.mark.parametrize("size", [1, 2])
def test_resume_at_any_batch_equals_the_uninterrupted_tail(size: int) -> None:
    c = cfg(*GMM)
    for rank in range(size):
        train, val, _ = build_loaders(c, rank, size, CPU, seed=7)
        for loader in (train, val):
            full = list(loader.epoch(2))
            for start in range(len(loader) + 1):
                tail = list(loader.epoch(2, start_batch=start))
                assert len(tail) == len(full) - start
                assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(tail, full[start:]))
        with pytest.raises(ValueError, match="outside"):
            list(train.epoch(0, start_batch=len(train) + 1))


def test_train_reshuffles_each_epoch_and_eval_train_is_the_split_in_order() -> None:
    c = cfg(*GMM)
    train, _, _ = build_loaders(c, 0, 1, CPU, seed=1)
    orders = [torch.cat([x for x, _ in train.epoch(e)]) for e in (0, 1)]
    assert not torch.equal(orders[0], orders[1])
    assert torch.equal(orders[0], torch.cat([x for x, _ in train.epoch(0)])), "an epoch's order is fixed"
    fixed, _, _ = build_loaders(c, 0, 1, CPU, seed=1, eval_train=True)
    train_set, _ = tensor.load(c.data)
    for epoch in (0, 1):
        x, y = (torch.cat(t) for t in zip(*fixed.epoch(epoch)))
        keep = y != PAD
        assert torch.equal(x[keep], train_set.images) and torch.equal(y[keep], train_set.labels)


# -- digits ---------------------------------------------------------------------------------------------
def test_digits_split_is_stratified_and_normalised() -> None:
    truth = load_digits()
    counts = np.bincount(truth.target)
    train, val = tensor.digits()
    assert (len(train), len(val)) == (1433, 364)  # as documented (data.bundled's help, tensor.py)
    assert np.bincount(val.labels.numpy()).tolist() == [math.ceil(n / 5) for n in counts]  # every 5th per class
    assert (np.bincount(train.labels.numpy()) + np.bincount(val.labels.numpy())).tolist() == counts.tolist()
    assert train.images.shape[1:] == val.images.shape[1:] == (1, 8, 8)
    assert abs(float(train.images.mean())) < 1e-5 and abs(float(train.images.std(unbiased=False)) - 1) < 1e-5
    # undo the documented normalisation: the 0..16 grey levels of the original images, each image once
    levels = torch.unique(train.images)
    assert len(levels) == 17
    step = float(levels[1] - levels[0])
    pixels = torch.cat([train.images, val.images]).flatten(1)
    ints = torch.round((pixels - levels[0]) / step)
    assert torch.allclose(ints, (pixels - levels[0]) / step, atol=1e-3)
    restored = sorted(map(tuple, ints.to(torch.int64).tolist()))
    assert restored == sorted(map(tuple, truth.data.astype(np.int64).tolist()))


# -- Gaussian mixture ------------------------------------------------------------------------------------
def test_gmm_is_deterministic_in_its_own_seed_and_shaped() -> None:
    a, b = tensor.gmm(cfg(*GMM).data), tensor.gmm(cfg(*GMM, "train.seed=5").data)
    assert all(torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels) for x, y in zip(a, b))
    other = tensor.gmm(cfg(*GMM, "data.gmm_seed=1").data)
    assert not torch.equal(a[0].images, other[0].images)
    longer = tensor.gmm(cfg(*GMM, "data.gmm_train=40").data)
    assert torch.equal(longer[1].images, a[1].images), "the val set does not depend on gmm_train"
    assert a[0].images.shape == (23, 1, 1, 10) and a[0].labels.tolist() == [i % 3 for i in range(23)]
    assert input_shape(cfg("data.bundled=gmm").data) == (1, 8, 8)  # d = 64 = 8^2: a square map
    assert input_shape(cfg("data.bundled=gmm", "data.gmm_dim=50").data) == (1, 1, 50)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gmm_bayes_accuracy_is_the_documented_one_and_within_its_bounds(seed: int) -> None:
    """The Bayes classifier (nearest true mean: equal priors, identity covariances) on 20,000 val examples
    of the default mixture: between the closed-form bounds from the known means, 1 - mean_i sum_j
    Phi(-D_ij / 2) (union bound) and 1 - mean_i max_j Phi(-D_ij / 2) (nearest rival alone), up to the
    sampling error (sd 0.002 here: margin 0.01); and about 90% as data.gmm_separation's help says (measured
    87.3-93.4% over 200 seeds)."""
    d = cfg("data.bundled=gmm", "data.gmm_val=20000", f"data.gmm_seed={seed}").data
    _, val = tensor.gmm(d)
    means = tensor.gmm_means(d.gmm_classes, d.gmm_dim, d.gmm_separation, d.gmm_seed)
    x = val.images.flatten(1).double().numpy()
    predicted = ((x[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    accuracy = float((predicted == val.labels.numpy()).mean())
    distance = np.sqrt(((means[:, None] - means[None]) ** 2).sum(-1))
    np.fill_diagonal(distance, np.inf)
    pairwise = norm.cdf(-distance / 2)
    low, high = 1 - pairwise.sum(1).mean(), 1 - pairwise.max(1).mean()
    assert low - 0.01 < accuracy < high + 0.01, (low, accuracy, high)
    assert 0.86 < accuracy < 0.95
    rms = math.sqrt((distance[np.isfinite(distance)] ** 2).mean())
    assert abs(rms / d.gmm_separation - 1) < 0.15, "two means lie gmm_separation apart (RMS)"


# -- configuration -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "message"), [
    (["data.gmm_classes=1"], "data.gmm_classes=1 is out of range"),
    (["data.gmm_dim=0"], "data.gmm_dim=0 is out of range"),
    (["data.gmm_train=0"], "data.gmm_train=0 is out of range"),
    (["data.gmm_val=-3"], "data.gmm_val=-3 is out of range"),
    (["data.gmm_separation=-1"], "data.gmm_separation=-1.0 is out of range"),
    (["data.gmm_seed=-1"], "data.gmm_seed=-1 is out of range"),
    (["data.bundled=cifar"], "data.bundled='cifar' is not one of mnist5k, digits, gmm"),
    (["data.bundled=digits", "data.backend=dali"], "data.backend=dali decodes image folders"),
    (["data.bundled=gmm", "data.gmm_dim=100000", "data.gmm_train=3000"], "over the 268,435,456"),
])
def test_bad_data_keys_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load(None, overrides)
    assert "\n" not in str(err.value)


def test_keys_that_only_apply_to_the_in_memory_sets_are_free_otherwise() -> None:
    load(None, ["data.bundled=digits", "data.backend=dali", "data.path=/some/folders"])  # the folders win
    load(None, ["data.gmm_dim=100000", "data.gmm_train=3000"])  # gmm not selected: never made
