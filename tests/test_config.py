"""Config loading, overrides and the one-line errors users see."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import config
from app.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = config.load(path)
    assert cfg.name == path.stem


def test_overrides_are_typed() -> None:
    cfg = config.load(REPO / "configs/demo.yaml", ["optim.lr=0.25", "train.epochs=2", "model.channels_last=true",
                                                     "kfac.skip=fc,layer1.*", "optim.milestones=[1, 2]"])
    assert cfg.optim.lr == 0.25 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 2.0
    assert cfg.model.channels_last is True
    assert cfg.kfac.skip == ["fc", "layer1.*"]
    assert cfg.optim.milestones == [1.0, 2.0]


@pytest.mark.parametrize("override, message", [
    ("optim.lr=abc", "config: optim.lr='abc' is not a number"),
    ("optim.lr=-1", "config: optim.lr=-1.0 is out of range (must be > 0.0)"),
    ("optim.name=rmsprop", "config: optim.name='rmsprop' is not one of sgd, lars, adam, adamw"),
    ("optim.lrr=0.1", "config: unknown key 'optim.lrr'"),
    ("nosuch.key=1", "config: unknown key 'nosuch'"),
    ("data.batch_size=1.5", "config: data.batch_size=1.5 is not an integer"),
    ("train.deterministic=maybe", "config: train.deterministic='maybe' is not true or false"),
    ("kfac.inverse_interval=15", "must be a multiple of kfac.factor_interval"),
    ("optim.lr", "must look like section.key=value"),
    ("optim.lr=nan", "config: optim.lr='nan' is not a number"),
])
def test_bad_values_give_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(REPO / "configs/demo.yaml", [override, "kfac.factor_interval=10"] if "interval" in override
                    else [override])
    text = str(info.value)
    assert message in text and "\n" not in text


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("optim: 3\n")
    with pytest.raises(ConfigError, match="optim must be a mapping"):
        config.load(notmap)


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = config.load(REPO / "configs/demo.yaml", ["optim.lr=0.3"])
    config.dump(cfg, tmp_path / "config.yaml")
    again = config.load(tmp_path / "config.yaml")
    assert again.to_dict() == cfg.to_dict()


def test_every_option_is_described() -> None:
    rows = config.describe()
    assert all(help_text for _, _, help_text in rows)
    assert ("optim.lr", 0.1) in [(k, d) for k, d, _ in rows]
