"""Rank-0 observability: progress display, metrics.csv, TensorBoard, the end-of-run plot, and the
machine-readable FINAL line that sweeps and job scripts parse."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from app.errors import DiskFullError
from app.storage import full_disk_as_error, write_atomic

log = logging.getLogger(__name__)

#: Columns of metrics.csv; later features append theirs via ``extra_fields``.
BASE_FIELDS = ("kind", "step", "epoch", "time_s", "loss", "top1", "top5", "lr",
               "img_per_s", "data_s", "step_s", "skipped_images")


@dataclass
class KFACSummary:
    """K-FAC's account of a run: how much of the every-layer-every-step work and traffic it did, and
    who owned which layers, so a user sees what adaptive intervals and ownership bought."""

    layers: int
    steps: int
    refreshes: int  # layer factor refreshes over the run
    bytes_sent: int  # factor bytes one rank handed to the exchange over the run (0 in one process)
    bytes_every_step: int  # what refreshing every layer at every one of those steps would have sent
    interval_mean: float
    interval_max: int
    owned_layers: list[list[str]]  # per rank, at the end of the run
    owned_bytes: list[int]  # per rank: the A/G factors it holds

    MAX_RANKS = 8  # ranks listed one per line; the rest are counted
    WIDTH = 120  # a rank's line is cut to this many characters

    @property
    def refresh_share(self) -> float:
        """Refreshes as a share of refreshing every layer every step."""
        return self.refreshes / max(self.layers * self.steps, 1)

    @property
    def traffic_share(self) -> float | None:
        """Factor bytes as a share of refreshing every step; None without factor traffic (one process)."""
        return self.bytes_sent / self.bytes_every_step if self.bytes_every_step else None

    def lines(self) -> list[str]:
        share = self.traffic_share
        traffic = ("no factor traffic (one process)" if share is None else
                   f"factor traffic {_mb(self.bytes_sent)} per rank = {share:.0%} of refreshing every step")
        head = (f"K-FAC: {self.layers} layers, {self.refreshes:,} factor refreshes ({self.refresh_share:.0%} of "
                f"refreshing every layer every step), {traffic}, mean interval {self.interval_mean:.1f} "
                f"(max {self.interval_max})")
        out = [head]
        for rank, (names, size) in enumerate(zip(self.owned_layers[:self.MAX_RANKS], self.owned_bytes)):
            out.append(_cut(f"K-FAC: rank {rank} owned {len(names)} layers (A/G factors {_mb(size)}): ", names,
                            self.WIDTH))
        if len(self.owned_layers) > self.MAX_RANKS:
            out.append(f"K-FAC: ... {len(self.owned_layers) - self.MAX_RANKS} more ranks")
        return out


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _cut(head: str, names: list[str], width: int) -> str:
    """``head`` and as many of ``names`` as fit in ``width`` characters, then how many were left out."""
    text = head + (", ".join(names) if names else "none")
    if len(text) <= width:
        return text
    shown: list[str] = []
    for name in names:
        tail = f", ... ({len(names) - len(shown) - 1} more)"
        if len(head + ", ".join(shown + [name]) + tail) > width:
            break
        shown.append(name)
    return f"{head}{', '.join(shown)}, ... ({len(names) - len(shown)} more)"


@dataclass
class Summary:
    """What a finished run reports; ``final_line`` is its stable text form, ``lines`` all of it."""

    val_top1: float
    val_loss: float
    epochs: int
    steps: int
    time_s: float
    img_per_s: float
    run_dir: Path
    skipped_images: int = 0  # unreadable images replaced (train and validation, all ranks)
    kfac: KFACSummary | None = None

    def final_line(self) -> str:
        """New keys go at the end, so older parsers keep reading the line."""
        return (f"FINAL val_top1={self.val_top1:.4f} val_loss={self.val_loss:.4f} "
                f"epochs={self.epochs} steps={self.steps} time_s={self.time_s:.1f} "
                f"img_per_s={self.img_per_s:.1f} run_dir={self.run_dir} skipped_images={self.skipped_images}")

    def lines(self) -> list[str]:
        """The end-of-run report; the FINAL line stays last (sweeps and job scripts parse it)."""
        return (self.kfac.lines() if self.kfac is not None else []) + [self.final_line()]

    def save(self, path: Path) -> None:
        """``summary.json``: the FINAL fields and, for K-FAC runs, the K-FAC summary's numbers."""
        data = {**asdict(self), "run_dir": str(self.run_dir)}
        if self.kfac is not None:
            data["kfac"].update(refresh_share=self.kfac.refresh_share, traffic_share=self.kfac.traffic_share)
        text = json.dumps(data, indent=1).encode()
        write_atomic(path, lambda f: f.write(text))


_INT_KEYS = ("epochs", "steps", "skipped_images")


def parse_final_line(line: str) -> dict[str, float | int | str]:
    """Inverse of ``Summary.final_line`` (for sweep reports and tests)."""
    if not line.startswith("FINAL "):
        raise ValueError(f"not a FINAL line: {line!r}")
    out: dict[str, float | int | str] = {}
    for item in line[len("FINAL "):].split():
        key, value = item.split("=", 1)
        out[key] = value if key == "run_dir" else int(value) if key in _INT_KEYS else float(value)
    return out


class Metrics:
    """Writes one CSV row per logged step / validation and mirrors them to TensorBoard and the
    console. Only rank 0 constructs one; other ranks pass ``None`` around instead."""

    def __init__(self, run_dir: Path, total_steps: int, *, tensorboard: bool, bar: bool,
                 extra_fields: tuple[str, ...] = (), stream: TextIO | None = None) -> None:
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.fields = BASE_FIELDS + tuple(f for f in extra_fields if f not in BASE_FIELDS)
        self.history: list[dict[str, Any]] = []
        self._stream = stream or sys.stdout  # looked up now: callers may have redirected it
        self._start = time.monotonic()
        self._csv_path = run_dir / "metrics.csv"
        new = not self._csv_path.exists()
        with full_disk_as_error(self._csv_path):
            self._csv_file = self._csv_path.open("ab", buffering=0)  # unbuffered: a failed row can be undone
        self._row = io.StringIO()
        self._csv = csv.DictWriter(self._row, fieldnames=self.fields, extrasaction="ignore")
        if new:
            self._csv.writeheader()
            self._append()
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        self._bar = None
        if bar:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, file=self._stream, dynamic_ncols=True, unit="step")

    def log(self, row: dict[str, Any]) -> None:
        row = {"time_s": round(time.monotonic() - self._start, 3), **row}
        self.history.append(row)
        self._csv.writerow({k: _fmt(v) for k, v in row.items()})
        self._append()
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("kind", "step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{row['kind']}/{key}", value, row["step"])
        self._show(row)

    def _append(self) -> None:
        """Append the row formatted in ``self._row`` to metrics.csv whole, or not at all: on a full disk
        the file is cut back to its last complete row (a new, empty file is removed) before raising."""
        data = self._row.getvalue().encode()
        self._row.seek(0)
        self._row.truncate()
        size = os.fstat(self._csv_file.fileno()).st_size
        try:
            with full_disk_as_error(self._csv_path):
                view = memoryview(data)
                while view:
                    view = view[self._csv_file.write(view) or 0:]
        except OSError:
            os.ftruncate(self._csv_file.fileno(), size)
            if size == 0:
                self._csv_file.close()
                self._csv_path.unlink(missing_ok=True)
            raise

    def _show(self, row: dict[str, Any]) -> None:
        if row["kind"] == "train" and self._bar is not None:
            self._bar.n = row["step"]
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['top1']:.3f}",
                                  img_s=f"{row['img_per_s']:.0f}", refresh=False)
            self._bar.refresh()
            return
        elapsed = time.monotonic() - self._start
        if row["kind"] == "train":
            done = max(row["step"], 1)
            eta = elapsed / done * max(self.total_steps - done, 0)
            text = (f"step {row['step']}/{self.total_steps} epoch {row['epoch']:.2f} "
                    f"loss {row['loss']:.4f} acc {row['top1']:.3f} lr {row['lr']:.4g} "
                    f"img/s {row['img_per_s']:.0f} eta {eta:.0f}s")
        else:
            text = (f"validation step {row['step']} epoch {row['epoch']:.2f} "
                    f"loss {row['loss']:.4f} top1 {row['top1']:.4f} top5 {row['top5']:.4f}")
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, file=self._stream, flush=True)

    def close(self, plot: bool) -> Path | None:
        if self._bar is not None:
            self._bar.close()
        self._csv_file.close()
        if self._tb is not None:
            self._tb.close()
        if not plot:
            return None
        try:
            return write_plot(self.history, self.run_dir / "plot.png")
        except DiskFullError as exc:  # a picture of metrics.csv, which is complete: not worth failing the run
            log.warning("plot not written: %s", exc)
            return None


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display on cluster nodes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Write ``fig`` as a PNG atomically (no half-written plot), then free it."""
    fig.tight_layout()
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        pyplot().close(fig)


def write_plot(history: list[dict[str, Any]], path: Path) -> Path:
    """Loss, accuracy and throughput against step, for a glance at a finished run."""
    plt = pyplot()
    train = [r for r in history if r["kind"] == "train"]
    val = [r for r in history if r["kind"] == "val"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("loss", "loss"), ("top1", "top-1 accuracy"), ("img_per_s", "images / s"))
    for ax, (key, title) in zip(axes, panels):
        ax.plot([r["step"] for r in train], [r[key] for r in train], label="train")
        if key != "img_per_s" and val:
            ax.plot([r["step"] for r in val], [r[key] for r in val], "o-", label="validation")
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    save_figure(fig, path)
    return path
