"""``spngd plan``: K-FAC memory and traffic per rank for any rank count.

The plan is computed by the functions the run uses; ``tests/mpi/plan_worker.py`` checks on 2-4 real
ranks that it equals the byte counters and ``KFAC.memory()``. Here: the buffer bound at ResNet-50's
target scale, conservation of the exchanged bytes, and the command's output and errors.
"""

from __future__ import annotations

import json
import math

import pytest
from mpi_helpers import REPO, run_check_worker

from app import config as config_mod
from app.cli import main
from app.config import KFACConfig
from app.kfac.exchange import packed_numel
from app.kfac.plan import DECISIONS, FACTORS, MIB, model_layers, plan_ranks

WORKER = REPO / "tests" / "mpi" / "plan_worker.py"
BS32K = REPO / "configs" / "imagenet_resnet50_kfac_bs32k.yaml"


@pytest.mark.mpi
@pytest.mark.parametrize("np", [2, 3, 4])
def test_plan_equals_the_counters_and_memory_of_real_ranks(np: int) -> None:
    run_check_worker(WORKER, "torch", np, timeout=300)


@pytest.mark.parametrize("share", ["inverses", "gradients"])
def test_resnet50_receive_buffers_hold_only_their_parts_at_target_scale(share: str) -> None:
    """No rank's receive buffers exceed the real parts it receives by more than 1% (the padded allgather
    made them up to 143x at 1,024 ranks), on the refresh-all and on the plain step."""
    kfac = config_mod.load(BS32K).kfac
    kfac = KFACConfig(**{**kfac.__dict__, "share": share})
    layers = model_layers("resnet50", 1000, kfac)
    for ranks in (64, 256, 1024):
        for p in plan_ranks(layers, kfac, ranks):
            for step in (p.refresh, p.plain):
                received = sum(t.received for t in step.values())
                data = sum(t.data for t in step.values())
                assert received <= 1.01 * data, (ranks, share, p.rank, step)


def test_exchanged_bytes_are_conserved() -> None:
    """Every packed factor reaches exactly one owner, every rank receives every other part of the
    allgather once, and every rank sends all the packed factors (a reduce-scatter's input)."""
    kfac = KFACConfig(bucket_mb=1.0)
    layers = model_layers("resnet18", 1000, kfac)
    packed = sum(packed_numel(layer.factor_slots) for layer in layers) * 4
    inverses = sum(packed_numel(layer.inverse_slots("cholesky")) for layer in layers) * 4
    plans = plan_ranks(layers, kfac, 7)
    assert sum(p.refresh[FACTORS].data for p in plans) == packed
    assert all(p.refresh[FACTORS].sent == packed for p in plans)
    sent = {p.rank: p.refresh["kfac.inverses"].sent for p in plans}
    assert sum(sent.values()) == inverses
    assert all(p.refresh["kfac.inverses"].data == inverses - sent[p.rank] for p in plans)
    assert all(p.refresh[DECISIONS].sent == (3 * len(layers) + 1) * 8 and p.plain == {} for p in plans)
    assert sum(p.memory["factors"] for p in plans) == sum(
        math.prod(s) for layer in layers for s in layer.factor_shapes) * 4
    one = plan_ranks(layers, kfac, 1)[0]
    assert one.refresh == one.plain == {} and one.memory["exchange"] == one.memory["share"] == 0


def test_plan_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "resnet50", "--ranks", "64,256,1024", "--config", str(BS32K), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == "resnet50"
    assert [(r["ranks"], r["share"]) for r in doc["rows"]] == [
        (p, s) for p in (64, 256, 1024) for s in ("inverses", "gradients")]
    for r in doc["rows"]:
        assert {"ranks", "share", "kfac_mem_max_mib", "kfac_mem_mean_mib", "recv_buffer_max_mib",
                "recv_parts_max_mib"} <= set(r)
        assert 0 < r["kfac_mem_mean_mib"] <= r["kfac_mem_max_mib"] < 16 * 1024  # fits a 16 GB V100 with room
        assert r["recv_parts_max_mib"] <= r["recv_buffer_max_mib"] <= 1.01 * r["recv_parts_max_mib"]
    gradients = [r for r in doc["rows"] if r["share"] == "gradients"]
    assert all(r["plain_received_max_mib"] > 0 for r in gradients)  # the gradient allgather runs every step


def test_plan_text_and_per_rank(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "cifar_resnet8", "--num-classes", "10", "--ranks", "3", "--share", "gradients",
                 "--per-rank"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("cifar_resnet8 (10 classes)") and out[2].split()[:2] == ["3", "gradients"]
    assert [line.split()[0] for line in out[-3:]] == ["0", "1", "2"]
    per = plan_ranks(model_layers("cifar_resnet8", 10, KFACConfig(share="gradients")), KFACConfig(share="gradients"),
                     3)
    assert [float(line.split()[1]) for line in out[-3:]] == [round(p.total / MIB, 1) for p in per]


@pytest.mark.parametrize("argv,message", [
    (["--ranks", "4,x"], "--ranks='4,x' must be comma-separated integers"),
    (["--ranks", "0"], "--ranks='0' must list positive rank counts"),
    (["--share", "weights"], "--share='weights' must list inverses and/or gradients"),
    (["--num-classes", "0"], "--num-classes=0 must be a positive integer"),
    (["--model", "vgg"], "model.arch"),
])
def test_plan_errors_are_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(["plan", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and message in err, err
