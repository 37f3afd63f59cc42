"""Generalisation measures (app/analysis/measures.py): float64 oracles for the norms and the PAC-Bayes
search, Kendall and granulated Kendall on a database of known rankings, the spectra plot, the CLI modes."""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from app import cli
from app.analysis import measures
from app.analysis.db import Database, open_db
from app.analysis.operators import Curvature
from app.comm.solo import SoloComm
from app.errors import UserError
from tests.test_analysis_db import make_row, make_snapshot
from tests.test_analysis_spectra import data, dense_matrix, mlp

COMM = SoloComm(torch.device("cpu"))


def relu_net(bias: bool = True, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4, bias=bias), nn.ReLU(), nn.Linear(4, 2, bias=bias)).double()


def paths(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> float:
    """sum over every input-output path of the product of its squared weights, path by path (a bias
    starts a path at its unit)."""
    total = 0.0
    for k in range(w2.shape[0]):
        total += float(b2[k]) ** 2
        for j in range(w2.shape[1]):
            total += float(w2[k, j] * b1[j]) ** 2
            for i in range(w1.shape[1]):
                total += float(w2[k, j] * w1[j, i]) ** 2
    return math.sqrt(total)


def test_path_norm_is_the_sum_over_paths() -> None:
    net = relu_net()
    w1, b1, w2, b2 = (p.detach() for p in net.parameters())
    assert measures.path_norm(net, (3,)) == pytest.approx(paths(w1, b1, w2, b2), rel=1e-13)


def test_path_norm_treats_batchnorm_as_its_eval_mode_affine_map() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()
    bn = net[1]
    with torch.no_grad():
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    a = bn.weight / (bn.running_var + bn.eps).sqrt()  # folded into the bias-free Linear before it
    b = bn.bias - a * bn.running_mean
    w1 = a[:, None] * net[0].weight
    expected = paths(w1.detach(), b.detach(), net[3].weight.detach(), net[3].bias.detach())
    assert measures.path_norm(net, (3,)) == pytest.approx(expected, rel=1e-13)
    assert net.training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # on a copy


def test_fisher_rao_and_param_norm_against_dense_oracles() -> None:
    x, y = data(7)
    net = mlp()
    norms = measures.snapshot_norms(net, x, y, COMM, total=7, seed=0, chunk=3)
    curv = Curvature(net, x, y, "ggn", COMM, total=7)
    theta = curv.flatten(curv.params)
    assert norms["fisher_rao_norm"] == pytest.approx(float(theta @ dense_matrix(curv) @ theta), rel=1e-11)
    assert norms["param_norm"] == pytest.approx(math.sqrt(sum(float((p ** 2).sum()) for p in net.parameters())),
                                                rel=1e-14)
    assert norms["pacbayes_flatness"] == 1 / norms["pacbayes_sigma"] ** 2


def test_fisher_rao_of_a_bias_free_relu_net_is_liangs_closed_form() -> None:
    """<theta, d f / d theta> = L f for a bias-free ReLU net of L layers (Liang et al. 2019), so
    theta^T F theta = L^2 / N sum_n f_n^T (diag p_n - p_n p_n^T) f_n."""
    net = relu_net(bias=False)
    x, y = torch.randn(9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)), torch.zeros(9).long()
    f = net(x).detach()
    p = F.softmax(f, 1)
    closed = 4 * float(((p * f ** 2).sum(1) - (p * f).sum(1) ** 2).mean())
    assert measures.snapshot_norms(net, x, y, COMM, total=9, seed=0)["fisher_rao_norm"] == pytest.approx(closed,
                                                                                                         rel=1e-12)


def self_labelled(n: int = 64, seed: int = 3) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A bias-free ReLU net and inputs labelled by its own predictions: accuracy 1, room for a 0.1 drop."""
    net = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False)).double()
    torch.manual_seed(seed)
    for p in net.parameters():
        nn.init.normal_(p)
    x = torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, x, y


def test_pacbayes_sigma_satisfies_its_definition_within_the_resolution() -> None:
    net, x, y = self_labelled()
    s = measures.pacbayes_sigma(net, x, y, COMM, total=len(x), seed=5, chunk=16)
    assert s.accuracy == 1.0 and measures.SIGMA_MIN < s.sigma < s.above < measures.SIGMA_MAX
    resolution = math.exp(math.log(measures.SIGMA_MAX / measures.SIGMA_MIN) / 2 ** measures.PACBAYES_STEPS)
    assert s.above / s.sigma == pytest.approx(resolution, rel=1e-9)

    def drop(sigma: float) -> float:
        return s.accuracy - measures.perturbed_accuracy(net, x, y, COMM, sigma, total=len(x), seed=5)

    assert drop(s.sigma) <= measures.PACBAYES_DROP < drop(s.above)
    assert drop(s.sigma) > 0  # the search is resolving a real drop, not a flat stretch at 0


@pytest.mark.parametrize("c", [4.0])
def test_a_sharper_copy_of_the_net_has_a_smaller_sigma(c: float) -> None:
    """The weights divided by c: the same predictions (f is 2-homogeneous), and theta / c + sigma z
    predicts as theta + c sigma z, so sigma' shrinks by c, up to the search's resolution."""
    net, x, y = self_labelled()
    sharp = copy.deepcopy(net)
    with torch.no_grad():
        for p in sharp.parameters():
            p.div_(c)
    flat_sigma = measures.pacbayes_sigma(net, x, y, COMM, total=len(x), seed=1)
    sharp_sigma = measures.pacbayes_sigma(sharp, x, y, COMM, total=len(x), seed=1)
    assert sharp_sigma.accuracy == flat_sigma.accuracy == 1.0
    resolution = math.log(measures.SIGMA_MAX / measures.SIGMA_MIN) / 2 ** measures.PACBAYES_STEPS
    assert sharp_sigma.sigma < flat_sigma.sigma
    assert abs(math.log(flat_sigma.sigma / sharp_sigma.sigma) - math.log(c)) <= resolution * (1 + 1e-9)


def test_snapshot_norms_leaves_the_model_as_it_was_and_is_reproducible() -> None:
    _, x, y = self_labelled(32)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    a = measures.snapshot_norms(net, x, y, COMM, total=32, seed=4)
    assert net.training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert measures.snapshot_norms(net, x, y, COMM, total=32, seed=4) == a
    assert set(a) == {"param_norm", "path_norm", "fisher_rao_norm", "pacbayes_sigma", "pacbayes_flatness"}


def test_effective_dimension() -> None:
    assert measures.effective_dimension([1.0, 0.1, 0.01, -0.5], 0.1) == pytest.approx(1 / 1.1 + 0.5 + 0.01 / 0.11)
    assert measures.effective_dimension([0.0, -1.0], 0.0) == 0.0


# -- Kendall on a database of known rankings ----------------------------------------------------

GRID = list(itertools.product((0, 1), repeat=3))  # (lr, width, weight decay) indices: a 2x2x2 grid


def grid_db(path: Path) -> Database:
    """Eight runs whose gaps rise with every axis; param_norm orders like the gap, path_norm against it,
    fisher_rao_norm rises with lr, falls with width and follows weight decay in 3 of 4 groups."""
    d = open_db(path)
    for lr, width, wd in GRID:
        run = f"lr{lr}w{width}d{wd}"
        gap = 0.1 + 0.05 * lr + 0.02 * width + 0.01 * wd
        fisher = lr - 0.7 * width + 0.1 * wd * (-1 if lr and width else 1)
        hparams = {"lr": [0.1, 0.2][lr], "width": [8, 16][width], "weight_decay": [0.0, 1e-4][wd], "opt": "sgd"}
        common: dict[str, Any] = dict(run=run, hparams=hparams, train_acc=0.9, val_acc=0.9 - gap)
        d.insert_snapshot(make_snapshot(step=1, param_norm=-gap, **common))  # an earlier step: not used
        d.insert_snapshot(make_snapshot(step=5, param_norm=2 * gap + 1, path_norm=-gap, fisher_rao_norm=fisher,
                                        pacbayes_flatness=None if lr else 1.0, **common))
        d.insert(make_row(step=5, eigenvalues=(10 * gap, 10 * gap ** 2, gap ** 2), trace=-gap, **common))
        d.insert(make_row(step=5, seed=1, eigenvalues=(-gap,), trace=gap, **common))  # another seed: not used
        d.insert(make_row(step=1, eigenvalues=(-gap,), trace=gap, **common))  # an earlier step: not used
    return d


def pairwise_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau without ties: (concordant - discordant) pairs over all pairs."""
    pairs = list(itertools.combinations(range(len(a)), 2))
    return sum(math.copysign(1, (a[i] - a[j]) * (b[i] - b[j])) for i, j in pairs) / len(pairs)


def test_measure_table_kendall_and_granulated(tmp_path: Path) -> None:
    with grid_db(tmp_path / "g.sqlite") as d:
        table = measures.measure_table(d)
    assert table.models == 8 and set(table.steps) == {5}
    assert table.axes == ("lr", "weight_decay", "width")  # opt is constant, the dataset too
    score = {s.measure: s for s in table.scores}
    for name in ("param_norm", "lambda_max", "effective_dim"):
        assert score[name].tau == pytest.approx(1.0) and score[name].granulated == pytest.approx(1.0)
    for name in ("path_norm", "trace"):
        assert score[name].tau == pytest.approx(-1.0) and score[name].granulated == pytest.approx(-1.0)
    fisher = score["fisher_rao_norm"]  # by hand: +1 in every lr group, -1 in every width group, wd 3 of 4
    assert fisher.psi == pytest.approx({"lr": 1.0, "width": -1.0, "weight_decay": 0.5})
    assert fisher.granulated == pytest.approx(1 / 6)
    column = [float(v) for v in table.values["fisher_rao_norm"]]  # type: ignore[arg-type]
    assert fisher.tau == pytest.approx(pairwise_tau(column, list(table.gaps)))
    # z = 0.1 lambda_max = gap: N_eff = 1 / 1.1 + gap / (gap + 0.1) + gap / (gap + 1), rising with the gap
    assert table.values["effective_dim"] == pytest.approx([1 / 1.1 + g / (g + 0.1) + g / (g + 1) for g in table.gaps])
    assert score["hessian_lambda_max"].models == 0 and math.isnan(score["hessian_lambda_max"].tau)
    flat = score["pacbayes_flatness"]  # only the lr=0 half has it: no lr group has two models
    assert flat.models == 4 and math.isnan(flat.psi["lr"]) and math.isnan(flat.tau)  # constant 1.0
    text = measures.render_markdown(table)
    assert "| parameter norm (baseline) | 8 | +1.000 |" in text and "psi weight_decay" in text
    assert json.loads(measures.render_json(table))["scores"][0]["measure"] == "lambda_max"


def test_measure_table_needs_models(tmp_path: Path) -> None:
    with open_db(tmp_path / "e.sqlite") as d:
        with pytest.raises(UserError, match="holds 0 models"):
            measures.measure_table(d)
        d.insert_snapshot(make_snapshot())
        d.insert_snapshot(make_snapshot(run="q", val_acc=None))  # no gap: not a model
        with pytest.raises(UserError, match="holds 1 models") as info:
            measures.measure_table(d)
        assert "\n" not in str(info.value)
        with pytest.raises(UserError, match="unknown matrix"):
            measures.measure_table(d, matrix="fisher")


# -- the plot and the CLI -------------------------------------------------------------------------

def spectra_db(path: Path) -> None:
    with open_db(path) as d:
        for run, scale in (("a", 1.0), ("b", 3.0)):
            for step in (0, 10, 20):
                for matrix, approximation in (("ggn", "full"), ("hessian", "block")):
                    eig = tuple(scale * (1 + step) / 2 ** i for i in range(4)) + (-1.0,)
                    d.insert(make_row(run=run, step=step, epoch=step / 10, matrix=matrix, approximation=approximation,
                                      eigenvalues=eig, k=5))


def test_plot_spectra_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    spectra_db(path)
    with open_db(path) as d:
        out = measures.plot_spectra(d, tmp_path / "new" / "s.png")
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert measures.plot_spectra(d, tmp_path / "a.png", runs=["a"]).is_file()
        with pytest.raises(UserError, match="holds no spectra for the runs zz"):
            measures.plot_spectra(d, tmp_path / "z.png", runs=["zz"])
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["s.png"]  # no temporary left


def test_cli_plot_and_measures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.sqlite"
    spectra_db(path)
    assert cli.main(["analyze", "--plot", str(path)]) == 0
    assert (tmp_path / "c_spectra.png").is_file() and "c_spectra.png" in capsys.readouterr().out
    grid_db(tmp_path / "g.sqlite").close()
    assert cli.main(["analyze", "--measures", str(tmp_path / "g.sqlite"), "--matrix", "ggn", "--approx", "full"]) == 0
    assert "| path norm (baseline) | 8 | -1.000 |" in capsys.readouterr().out
    assert cli.main(["analyze", "--measures", str(tmp_path / "g.sqlite"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"] == 8


@pytest.mark.parametrize(("args", "needle"), [
    (["--plot", "{db}", "--run", "x"], "--plot reads a database; it does not take --run"),
    (["--measures", "{db}", "--config", "c.yaml"], "--measures reads a database; it does not take --config"),
    (["--measures", "{db}", "--plot", "{db}"], "does not take --measures"),
    (["--measures", "{db}", "--out", "x.png"], "does not take --out"),
    (["--measures", "{db}", "--matrix", "ggn,hessian"], "one --matrix and one --approx"),
    (["--measures", "{db}"], "holds 0 models"),
    (["--plot", "{db}"], "holds no spectra"),
    (["--plot", "{missing}"], "no database"),
    (["--run", "x"], "give --db"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                        needle: str) -> None:
    open_db(tmp_path / "empty.sqlite").close()
    argv = [a.format(db=tmp_path / "empty.sqlite", missing=tmp_path / "none.sqlite") for a in args]
    assert cli.main(["analyze", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "none.sqlite").exists()
