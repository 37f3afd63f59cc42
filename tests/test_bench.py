"""``spngd bench`` on the CPU: the JSON rows, the K-FAC/SGD ratio, the phase breakdown, the case plan
and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app import bench
from app.cli import build_parser, fill, main
from app.config import KFACConfig
from app.kfac.plan import model_layers, plan_ranks

REPO = Path(__file__).resolve().parents[1]
ROW_KEYS = {"model", "batch", "precision", "channels_last", "optim", "factor_interval", "inverse_interval",
            "ms_per_step", "img_per_s", "peak_mem_gib", "kfac_mem_mib", "phases", "ratio_to_sgd", "timed_steps"}


def test_cpu_bench_rows_ratio_and_phases(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    res = subprocess.run(
        [sys.executable, "-m", "app", "bench", "--model", "cifar_resnet8", "--image-size", "32", "--batch", "8",
         "--classes", "10", "--optim", "sgd,kfac", "--factor-interval", "1,2", "--inverse-interval", "1,4",
         "--steps", "6", "--warmup", "2", "--device", "cpu", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stderr.lower(), res.stderr  # no NaN or retry paths were timed
    doc = json.loads(out.read_text())
    assert doc["device"].startswith("cpu") and doc["steps"] == 6 and doc["command"].startswith("spngd bench ")
    rows = doc["rows"]
    # (2, 1) is skipped: an inverse interval must be a multiple of the factor interval
    assert [(r["optim"], r["factor_interval"], r["inverse_interval"]) for r in rows] == [
        ("sgd", None, None), ("kfac", 1, 1), ("kfac", 1, 4), ("kfac", 2, 4)]
    assert [r["timed_steps"] for r in rows] == [6, 6, 8, 8]  # rounded up to whole inverse intervals
    sgd = rows[0]
    assert sgd["ratio_to_sgd"] == 1.0
    assert sgd["phases"]["factor_stats"] == sgd["phases"]["inversion"] == sgd["phases"]["preconditioning"] == 0.0
    for r in rows:
        assert set(r) == ROW_KEYS
        assert (r["model"], r["batch"], r["precision"], r["channels_last"]) == ("cifar_resnet8", 8, "fp32", False)
        assert r["img_per_s"] == pytest.approx(8e3 / r["ms_per_step"], rel=1e-3)
        assert r["ratio_to_sgd"] == pytest.approx(r["ms_per_step"] / sgd["ms_per_step"], rel=1e-3)
        assert list(r["phases"]) == list(bench.PHASES) and min(r["phases"].values()) >= 0.0
        # measured in separate passes (synchronised vs not) on a shared CPU: roughly, not exactly
        assert 0.4 < sum(r["phases"].values()) / r["ms_per_step"] < 2.5, r
        assert r["peak_mem_gib"] > 0.0
    # K-FAC's own memory is the plan's figure for one rank (the bench runs one process)
    kfac_cfg = KFACConfig()
    one_rank = plan_ranks(model_layers("cifar_resnet8", 10, kfac_cfg), kfac_cfg, 1)[0].total / 2 ** 20
    assert sgd["kfac_mem_mib"] is None and all(r["kfac_mem_mib"] == round(one_rank, 3) for r in rows[1:])
    every_step = rows[1]
    assert every_step["ratio_to_sgd"] > 1.0 and every_step["peak_mem_gib"] > sgd["peak_mem_gib"]
    assert every_step["phases"]["inversion"] > 0.0 and every_step["phases"]["factor_stats"] > 0.0
    lines = res.stdout.strip().splitlines()
    assert lines[1].startswith("| model | batch |") and len(lines) == 3 + len(rows)
    assert "| kfac | 2/4 |" in lines[-1]


def test_plan_is_the_cross_product_with_sgd_first() -> None:
    args = build_parser().parse_args(
        ["bench", "--model", "cifar_resnet20", "--batch", "32,128", "--precision", "fp32,bf16", "--channels-last",
         "on", "--optim", "kfac,sgd", "--factor-interval", "1,10", "--inverse-interval", "1,100",
         "--image-size", "48", "--set", "kfac.damping=0.01"])
    planned = bench.plan(fill(bench.Options, args))
    assert len(planned) == 2 * 2 * 4  # batches x precisions x (sgd + three consistent interval pairs)
    first = [(c.optim, c.factor_interval, c.inverse_interval) for c, _ in planned[:4]]
    assert first == [("sgd", None, None), ("kfac", 1, 1), ("kfac", 1, 100), ("kfac", 10, 100)]
    case, cfg = planned[7]
    assert (case.batch, case.precision, case.channels_last) == (32, "bf16", True)
    assert (cfg.model.arch, cfg.data.backend, cfg.data.batch_size, cfg.data.image_size) == (
        "cifar_resnet20", "synthetic", 32, 48)
    assert (cfg.train.precision, cfg.model.channels_last, cfg.optim.preconditioner) == ("bf16", True, "kfac")
    assert (cfg.kfac.factor_interval, cfg.kfac.inverse_interval, cfg.kfac.damping) == (10, 100, 0.01)
    assert planned[0][1].optim.preconditioner == "none"


def test_amortised_phases_isolates_each_kfac_phase() -> None:
    # probe steps 4..11: kinds FI, none, F, none, FI, none, F, none; fwd+bwd 10 (+2 capturing factors),
    # K-FAC step: precondition 1, + factor fold 3, + inversion 20; optimiser 0.5
    def lap(step: int) -> dict[str, float]:
        factors, inverse = step % 2 == 0, step % 4 == 0
        return {"forward_backward": 10.0 + 2.0 * factors, "kfac": 1.0 + 3.0 * factors + 20.0 * inverse,
                "optimizer": 0.5}

    phases = bench.amortised_phases([lap(s) for s in range(4, 12)], 4, factor_interval=10, inverse_interval=100)
    assert phases == pytest.approx({"forward_backward": 10.0, "factor_stats": 0.5, "inversion": 0.2,
                                    "preconditioning": 1.0, "optimizer": 0.5})


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0,abc"], "bench: --batch '0,abc': '0' is not a positive integer"),
    (["--batch", "8,abc"], "bench: --batch '8,abc': 'abc' is not a positive integer"),
    (["--model", "resnet51"], "bench: --model 'resnet51': 'resnet51' is not one of resnet18, "),
    (["--channels-last", "yes"], "bench: --channels-last 'yes': 'yes' is not one of on, off"),
    (["--factor-interval", "10", "--inverse-interval", "15"],
     "bench: no --inverse-interval (15) is a multiple of a --factor-interval (10)"),
    (["--steps", "0"], "bench: need --steps >= 1 and --warmup >= 0 (got 0, 10)"),
    (["--set", "kfac.damping=-1"], "config: kfac.damping=-1.0 is out of range (must be > 0.0)"),
    (["--set", "kfac.adaptive_lambda=0.2"], "bench: kfac.adaptive_lambda > 0 is not supported"),
    (["--out", "/nonexistent/dir/results.json", "--device", "cpu"], "bench: cannot write --out /nonexistent/"),
])
def test_bad_input_is_one_line_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--model", "cifar_resnet8", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"spngd: error: {message}"), err


def test_bayesian_optimiser_rows(tmp_path: Path) -> None:
    """adam, vogn and noisy_kfac rows: built and stepped as training does (two weight samples, so the sampled
    passes and K-FAC's micro-batch count are exercised), ratio to the SGD row, memory, the phases they have."""
    out = tmp_path / "results.json"
    assert main(["bench", "--model", "cifar_resnet8", "--image-size", "8", "--batch", "4", "--classes", "3",
                 "--optim", "noisy_kfac,vogn,adam,sgd", "--steps", "2", "--warmup", "1", "--device", "cpu",
                 "--set", "bayes.samples=2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    # regression: the bench started a gloo process group for these rows and left it for the next test's
    assert not torch.distributed.is_initialized()
    assert [(r["optim"], r["factor_interval"]) for r in rows] == [("sgd", None), ("adam", None), ("vogn", None),
                                                                  ("noisy_kfac", 1)]
    sgd = rows[0]
    for r in rows:
        assert set(r) == ROW_KEYS and list(r["phases"]) == list(bench.PHASES)
        # the ratio is rounded to 3 decimals: 5e-4 absolute, however small it is
        assert r["ratio_to_sgd"] == pytest.approx(r["ms_per_step"] / sgd["ms_per_step"], rel=1e-3, abs=6e-4)
        assert r["ms_per_step"] > 0.0 and r["peak_mem_gib"] > 0.0
        # no probe splits K-FAC's phases for these: fwd+bwd (with the sampling) and the optimiser only
        assert r["phases"]["factor_stats"] == r["phases"]["inversion"] == r["phases"]["preconditioning"] == 0.0
        assert r["phases"]["forward_backward"] > 0.0 and r["phases"]["optimizer"] > 0.0
    assert rows[2]["kfac_mem_mib"] is None and rows[3]["kfac_mem_mib"] > 0.0


def test_bayesian_step_is_the_trainers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench steps a sampling optimiser through ``train.sample_passes``: ``bayes.samples`` weight samples
    from the grid's generators, and ``kfac.step`` left to noisy K-FAC."""
    args = build_parser().parse_args(["bench", "--model", "cifar_resnet8", "--image-size", "8", "--batch", "4",
                                      "--classes", "3", "--optim", "noisy_kfac", "--set", "bayes.samples=3"])
    (case, cfg), = bench.plan(fill(bench.Options, args))
    run = bench._Run.build(cfg, torch.device("cpu"))
    assert run.sampler is run.optimizer and run.samples == 3 and run.kfac is not None
    drawn: list[int] = []
    sampled = run.optimizer.sampled_params  # type: ignore[attr-defined]
    monkeypatch.setattr(run.optimizer, "sampled_params", lambda g: drawn.append(g.initial_seed()) or sampled(g))
    kfac_steps: list[float] = []
    kfac_step = run.kfac.step
    monkeypatch.setattr(run.kfac, "step", lambda lr: kfac_steps.append(lr) or kfac_step(lr))
    before = [p.detach().clone() for p in run.model.parameters()]
    run.step(5)  # K-FAC raises if it sees more fisher_backward passes than begin_step(micro_batches=) announced
    assert drawn == [g.initial_seed() for g in run.grid.generators(torch.device("cpu"), cfg.train.seed, 5)]
    assert len(kfac_steps) == 1  # noisy K-FAC's own call, not a second one from the bench
    assert any(not torch.equal(b, p) for b, p in zip(before, run.model.parameters()))
