"""The end-of-run K-FAC summary: refresh and traffic shares against refreshing every layer every step,
ownership per rank, and its text (in-process, ranks as threads); the printed lines of a real run are
checked by the demo test in test_train.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch.nn.functional as F
from test_kfac import data, net
from thread_comm import ThreadComm, ThreadWorld

from app.config import KFACConfig
from app.kfac import KFAC
from app.metrics import KFACSummary, Summary, parse_final_line


def summaries(cfg: KFACConfig, steps: int, ranks: int) -> list[KFACSummary]:
    """Every rank's summary after ``steps`` data-parallel K-FAC steps of the small test net."""
    base = net()

    def rank(comm: ThreadComm) -> KFACSummary:
        model = copy.deepcopy(base)
        kfac = KFAC(model, cfg, comm)
        for step in range(steps):
            model.zero_grad(set_to_none=True)
            kfac.begin_step(step)
            x, y = data(4, seed=step * ranks + comm.rank)
            kfac.fisher_backward(out := model(x))
            F.cross_entropy(out, y).backward()
            for p in model.parameters():
                comm.allreduce(p.grad)
            kfac.step(0.1)
        return kfac.summary()

    return ThreadWorld(ranks).run(rank)


def test_every_step_refresh_is_the_whole_yardstick() -> None:
    s, other = summaries(KFACConfig(), steps=3, ranks=2)
    assert s == other  # every rank reports the same
    assert (s.layers, s.steps, s.refreshes) == (4, 3, 12)
    assert s.refresh_share == 1.0 and s.traffic_share == 1.0 and s.bytes_sent > 0
    assert (s.interval_mean, s.interval_max) == (1.0, 1)
    # the factors are owned by both ranks, each layer by one
    assert all(s.owned_layers) and sorted(n for names in s.owned_layers for n in names) == ["bn", "conv", "fc", "out"]
    # A/G factor bytes in float32: conv (18+1)^2 + 3^2, bn 3 blocks of 2x2, fc (48+1)^2 + 4^2, out (4+1)^2 + 3^2
    assert sum(s.owned_bytes) == 4 * (19 ** 2 + 9 + 12 + 49 ** 2 + 16 + 25 + 9)


def test_fixed_interval_ten_refreshes_and_sends_a_tenth() -> None:
    s, _ = summaries(KFACConfig(factor_interval=10, inverse_interval=10), steps=20, ranks=2)
    assert (s.steps, s.refreshes) == (20, 8)  # steps 0 and 10, 4 layers each
    assert s.refresh_share == pytest.approx(0.1) and s.traffic_share == pytest.approx(0.1)
    assert "(10% of refreshing every layer every step)" in s.lines()[0]
    assert "= 10% of refreshing every step" in s.lines()[0]


def test_adaptive_intervals_refresh_less_than_every_step() -> None:
    s, _ = summaries(KFACConfig(adaptive_lambda=10.0), steps=8, ranks=2)  # every Diff below: intervals grow
    assert s.interval_max > 1 and s.refresh_share < 1.0
    assert s.traffic_share == pytest.approx(s.refresh_share)  # every layer refresh sends its factors once


def test_one_process_has_no_factor_traffic() -> None:
    model = net()
    kfac = KFAC(model, KFACConfig())
    kfac.begin_step(0)
    x, y = data()
    kfac.fisher_backward(out := model(x))
    F.cross_entropy(out, y).backward()
    kfac.step(0.1)
    s = kfac.summary()
    assert s.refresh_share == 1.0 and s.traffic_share is None and s.owned_layers == [["conv", "bn", "fc", "out"]]
    assert "no factor traffic (one process)" in s.lines()[0]


def _summary(ranks: int, names_per_rank: int) -> KFACSummary:
    owned = [[f"layer{r}.block{i}.conv{i}" for i in range(names_per_rank)] for r in range(ranks)]
    return KFACSummary(layers=ranks * names_per_rank, steps=100, refreshes=1234, bytes_sent=12_345_678,
                       bytes_every_step=45_000_000, interval_mean=4.24, interval_max=9, owned_layers=owned,
                       owned_bytes=[1_200_000] * ranks)


def test_lines_list_at_most_eight_ranks_and_cut_long_name_lists() -> None:
    lines = _summary(ranks=10, names_per_rank=20).lines()
    assert lines[0] == ("K-FAC: 200 layers, 1,234 factor refreshes (6% of refreshing every layer every step), "
                        "factor traffic 12.3 MB per rank = 27% of refreshing every step, mean interval 4.2 (max 9)")
    ranks = lines[1:-1]
    assert [line.split()[2] for line in ranks] == [str(r) for r in range(8)]
    assert lines[-1] == "K-FAC: ... 2 more ranks"
    for r, line in enumerate(ranks):
        assert line.startswith(f"K-FAC: rank {r} owned 20 layers (A/G factors 1.2 MB): layer{r}.block0.conv0, ")
        assert len(line) <= KFACSummary.WIDTH
        shown = line.split(": ", 2)[2].split(", ")
        assert shown[-1] == f"... ({20 - len(shown) + 1} more)"
    short = _summary(ranks=2, names_per_rank=2).lines()
    assert short[1] == "K-FAC: rank 0 owned 2 layers (A/G factors 1.2 MB): layer0.block0.conv0, layer0.block1.conv1"


def test_final_line_stays_last_and_summary_json_has_the_numbers(tmp_path: Path) -> None:
    kfac = _summary(ranks=2, names_per_rank=2)
    s = Summary(val_top1=0.9875, val_loss=0.04, epochs=4, steps=100, time_s=90.0, img_per_s=300.0,
                run_dir=tmp_path, kfac=kfac)
    lines = s.lines()
    assert lines[:-1] == kfac.lines() and parse_final_line(lines[-1])["val_top1"] == 0.9875
    assert Summary(**{**s.__dict__, "kfac": None}).lines() == [s.final_line()]
    s.save(tmp_path / "summary.json")
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["val_top1"] == 0.9875 and saved["run_dir"] == str(tmp_path)
    assert saved["kfac"]["refreshes"] == 1234 and saved["kfac"]["owned_layers"] == kfac.owned_layers
    assert saved["kfac"]["traffic_share"] == pytest.approx(12_345_678 / 45_000_000)
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left
