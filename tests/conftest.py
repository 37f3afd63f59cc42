"""Fixtures several test files share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from app import config, launch
from app.comm import Comm


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[launch.World, Comm]]:
    """One process, one communicator for every trainer of a module (the library starts once)."""
    found = launch.discover()
    comm = launch.init_comm(found, config.CommConfig(), torch.device("cpu"))
    yield found, comm
    comm.shutdown()
