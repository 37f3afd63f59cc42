"""Out-of-distribution image sets that need no download, in a run's own input format (``spngd evaluate``).

Every set yields normalised float32 NCHW batches exactly like the run's validation loader: 3 channels,
``data.image_size`` square, ImageNet mean/std (``common.normalise``), so the model sees nothing but the
change of distribution. Each call of ``OODSet.batches()`` yields the same images in the same order, on
every rank and for every run (fixed seeds, independent of ``train.seed``), so runs compare on one set.

* ``digits`` (1,797 images) - scikit-learn's bundled 8x8 handwritten digits (0..16 grey levels scaled
  to 0..255), centre-cropped and resized bilinearly by the validation transform (``folder.centre_crop``)
  to the run's size. The same ten classes in another hand, scanner and resolution (blurry, thick
  strokes filling the frame): a covariate shift, "near" OOD, on which a model should be less sure.
* ``inverted`` (as many as the validation set) - the validation images with every pixel p -> 255 - p:
  dark strokes on a light background, a contrast no MNIST image has.
* ``rotated`` (as many as the validation set) - the validation images rotated by 90 degrees
  (counter-clockwise): strokes in orientations the digits never take (a rotated 0, 1 or 8 still
  resembles one, so this set is partly "near").
* ``noise`` (as many as the validation set) - uniform noise, every pixel and channel an independent
  integer in 0..255 from a fixed seed: no structure at all, "far" OOD.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from app.config import DataConfig
from app.data import in_memory, input_shape
from app.data.common import MEAN_255, PAD, STD_255, Loader, normalise
from app.data.folder import centre_crop
from app.errors import DataError

ABOUT = {
    "digits": "scikit-learn's 8x8 handwritten digits, resized (1,797 images)",
    "inverted": "the validation images inverted (p -> 255 - p)",
    "rotated": "the validation images rotated by 90 degrees",
    "noise": "uniform noise images (seeded), as many as the validation set",
}
NOISE_SEED = 0  # fixed, not train.seed: every run is scored against the same noise


@dataclass(frozen=True)
class OODSet:
    name: str
    size: int  # images
    batches: Callable[[], Iterator[Tensor]]  # each call yields the same normalised images


def check(name: str, data: DataConfig | None = None) -> None:
    """Refuse an unknown set name, or one that cannot take the run's input format ``data``, with one
    line (before any collective starts). The in-memory sets (digits, gmm: not 3-channel ImageNet-normalised
    images) take only ``rotated``, and only when their images are square."""
    if name not in ABOUT:
        raise DataError(f"evaluate: unknown OOD set {name!r} (known: {', '.join(sorted(ABOUT))})")
    if data is not None and in_memory(data):
        _, h, w = input_shape(data)
        if name != "rotated" or h != w:
            usable = "use --ood rotated" if h == w else "it has no OOD set"
            raise DataError(f"evaluate: OOD set {name!r} is 3-channel images; the run's data.bundled={data.bundled} "
                            f"is {h}x{w} tensors ({usable})")


def val_images(val: Loader) -> Iterator[Tensor]:
    """The validation loader's real images (padding and unreadable slots left out), in loader order."""
    for x, y in val.epoch(0):
        yield x[y != PAD]


def build(name: str, data: DataConfig, val: Loader, val_count: int, device: torch.device) -> OODSet:
    """The set ``name`` for a run whose data section is ``data`` and validation loader ``val``, which
    yields ``val_count`` real images."""
    check(name)
    if name == "digits":
        images = _digits(data.image_size, data.val_resize)
        return OODSet(name, len(images), lambda: (normalise(b.to(device)) for b in images.split(data.batch_size)))
    if name == "inverted":
        return OODSet(name, val_count, lambda: (_inverted(x) for x in val_images(val)))
    if name == "rotated":
        return OODSet(name, val_count, lambda: (torch.rot90(x, 1, dims=(2, 3)) for x in val_images(val)))
    return OODSet(name, val_count, lambda: _noise(val_count, data.image_size, data.batch_size, device))


def _digits(size: int, val_resize: int) -> Tensor:
    """scikit-learn's digits as uint8 RGB NCHW at ``size``, through the validation crop and resize."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    pixels = np.rint(load_digits().images * (255 / 16)).astype(np.uint8)
    box = centre_crop(8, 8, val_resize, size)
    out = [np.asarray(Image.fromarray(p, "L").convert("RGB").resize((size, size), Image.Resampling.BILINEAR,
                                                                    box=box)) for p in pixels]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def _inverted(x: Tensor) -> Tensor:
    """normalise(255 - p) from normalise(p) = (p - mean) / std: (255 - 2 mean) / std - x, per channel."""
    mean = torch.tensor(MEAN_255, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD_255, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (255 - 2 * mean) / std - x


def _noise(count: int, size: int, batch: int, device: torch.device) -> Iterator[Tensor]:
    rng = np.random.default_rng(NOISE_SEED)
    for start in range(0, count, batch):
        n = min(batch, count - start)
        yield normalise(torch.from_numpy(rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)).to(device))
