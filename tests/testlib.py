"""Small helpers several test files share (imported like ``mpi_helpers``: tests/ is on sys.path)."""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import Tensor

REPO = Path(__file__).resolve().parent.parent


def load_script(name: str) -> ModuleType:
    """``experiments/<name>.py`` as a module (the experiments are scripts, not part of the package); their
    imports of one another resolve as when run as scripts, from experiments/ on the path."""
    if str(REPO / "experiments") not in sys.path:
        sys.path.append(str(REPO / "experiments"))
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class WrongGrad(torch.autograd.Function):
    """The identity whose backward is 1.5x too large: a backprop bug the gradient check must catch."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return x * 1.0

    @staticmethod
    def backward(ctx: object, g: Tensor) -> Tensor:
        return 1.5 * g


@contextlib.contextmanager
def tmpfs(mnt: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted at ``mnt`` with ``options`` (e.g. ``size=8m``, ``ro,size=1m``), unmounted on
    exit; the calling test is skipped with the reason where mounting is not permitted."""
    mnt.mkdir(exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) here: {res.stderr.strip() or res.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def smoke_trainer(world: tuple[Any, Any], tmp: Path, *overrides: str) -> Any:
    """A one-process ``Trainer`` of configs/smoke.yaml with ``overrides``, writing under ``tmp``."""
    from app import config
    from app.train import Trainer

    torch.set_num_threads(1)
    cfg = config.load(REPO / "configs" / "smoke.yaml", [*overrides, f"output.dir={tmp}"])
    return Trainer(cfg, world[0], world[1], torch.device("cpu"))
