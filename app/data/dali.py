"""DALI backend: fn.readers.file -> fn.decoders (mixed on GPU, cpu without one) -> resize -> normalise.

Sharding is the shared ShardPlan, not the reader's shard_id/num_shards: DALI's reader rotates
shards between epochs and shuffles only inside a 1,024-sample buffer, which can neither match the
torch backend nor restart mid-epoch. So each epoch builds one pipeline whose reader gets this
rank's ordered file list (already a whole number of batches, PAD slots labelled -1); building
takes milliseconds. Resuming at ``start_batch`` reproduces the images and labels of every batch,
but not the random crops and flips, whose state lives inside DALI (the pipeline is re-seeded from
(seed, epoch, rank, start_batch)).

DALI 2.4 has no skip-on-error option: an unreadable file kills the pipeline. The loader then
decodes that batch's files with PIL, remembers the culprits and rebuilds the pipeline from the same
batch with them replaced exactly as in the torch backend. Healthy datasets pay nothing (no
up-front scan of 1.28 M files); each bad file costs one rebuild, once per run. DALI's image codec
also prints its own "[ERROR] ..." line to stderr for such a file; that is expected.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import torch

from app.config import DataConfig
from app.data.common import (
    MEAN_255,
    PAD,
    STD_255,
    DataError,
    PlannedLoader,
    ShardPlan,
    Split,
    candidates,
    why_unreadable,
)

_INSTALL = ".venv/bin/python -m pip install nvidia-dali-cuda120==2.4.0"


def _require_dali() -> SimpleNamespace:
    """Import DALI on first use, so the other backends never need it."""
    try:
        from nvidia.dali import fn, pipeline, types
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIClassificationIterator
    except ImportError as exc:
        raise DataError(f"data: backend 'dali' needs NVIDIA DALI ({exc}); install it with: {_INSTALL}") \
            from None
    return SimpleNamespace(fn=fn, types=types, Pipeline=pipeline.Pipeline,
                           Iterator=DALIClassificationIterator, LastBatchPolicy=LastBatchPolicy)


class DaliLoader(PlannedLoader):
    """DALI loader of one split on one rank (see ``common.Loader``)."""

    def __init__(self, split: Split, plan: ShardPlan, cfg: DataConfig, device: torch.device,
                 seed: int) -> None:
        self._dali = _require_dali()
        super().__init__(split, plan, device)
        self._split, self._cfg, self._seed = split, cfg, seed
        # index -> reason, for entries known to break the reader: non-files from the scan up front
        # (a FIFO would block it), then each file the decoder failed on
        self._bad: dict[int, str] = dict(split.unreadable)

    def _iterate(self, epoch: int, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._plan.indices(epoch)
        while batch < len(self):
            try:
                for images, labels in self._run(order, epoch, batch):
                    yield images, labels
                    batch += 1
            except RuntimeError:  # DALI's pipeline failure; retry only when a culprit is found
                if not self._find_bad(order, batch):
                    raise

    def _find_bad(self, order: np.ndarray, batch: int) -> bool:
        """Decode with PIL the files of the failed batch (and of the two it may have prefetched)."""
        b = self.batch_size
        for k in range(batch, min(batch + 3, len(self))):
            found = False
            for i in order[k * b:(k + 1) * b].tolist():
                if i != PAD and i not in self._bad and (reason := why_unreadable(self._split.path(i))):
                    self._bad[i], found = reason, True
            if found:
                return True
        return False

    def _readable(self, index: int) -> int:
        """``index`` or the next file not known to be bad (the torch backend's replacement rule)."""
        for j in candidates(index, len(self._split)):
            if j not in self._bad:
                return j
        raise DataError(f"data: no readable image in '{self._split.root}'")

    def _slots(self, indices: np.ndarray) -> tuple[list[str], list[int], list[int | None]]:
        """Files and labels for the reader, and per slot the bad file it replaces (train: by the next
        readable file, val: by a PAD slot so the image is not scored)."""
        files, labels = [], []
        replaced: list[int | None] = []
        for i in indices.tolist():
            bad = i if i != PAD and i in self._bad else None
            if bad is not None:
                i = self._readable(i) if self._plan.train else PAD
            if i == PAD:  # the reader needs some file; its image is ignored
                files.append(self._split.path(self._readable(0)))
                labels.append(PAD)
            else:
                files.append(self._split.path(i))
                labels.append(int(self._split.labels[i]))
            replaced.append(bad)
        return files, labels, replaced

    def _run(self, order: np.ndarray, epoch: int, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        b = self.batch_size
        files, labels, replaced = self._slots(order[batch * b:])
        state = np.random.SeedSequence([self._seed, epoch, self._plan.rank, batch]).generate_state(1)
        seed = int(state[0] >> 1)  # DALI wants a non-negative int64
        d = self._dali
        it = d.Iterator(self._pipeline(files, labels, seed), reader_name="Reader",
                        last_batch_policy=d.LastBatchPolicy.PARTIAL)
        for k, out in enumerate(it):
            for bad in replaced[k * b:(k + 1) * b]:
                if bad is not None:
                    self._skips.record([(bad, self._bad[bad])])
            # The iterator reuses its output buffers: copy before handing them out.
            yield (out[0]["data"].to(self.device, copy=True),
                   out[0]["label"].view(-1).to(self.device, torch.int64))

    def _pipeline(self, files: list[str], labels: list[int], seed: int) -> object:
        d, cfg, size = self._dali, self._cfg, self._cfg.image_size
        fn, types = d.fn, d.types
        gpu = self.device.type == "cuda"
        device_id = None  # CPU-only pipeline
        if gpu:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        pipe = d.Pipeline(batch_size=self.batch_size, num_threads=max(1, cfg.workers), device_id=device_id,
                          seed=seed)
        with pipe:
            encoded, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="Reader")
            decoder = "mixed" if gpu else "cpu"
            if self._plan.train:
                images = fn.decoders.image_random_crop(
                    encoded, device=decoder, output_type=types.RGB, random_area=[cfg.min_crop_area, 1.0],
                    random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
                images = fn.resize(images, resize_x=size, resize_y=size)
                mirror = fn.random.coin_flip(probability=0.5) if cfg.random_mirror else 0
            else:
                images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
                images = fn.resize(images, resize_shorter=cfg.val_resize)
                mirror = 0
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                              crop=(size, size), mean=list(MEAN_255), std=list(STD_255),
                                              mirror=mirror)
            pipe.set_outputs(images, label)
        return pipe
