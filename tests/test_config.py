"""Config loading, overrides and the one-line errors users see."""

from __future__ import annotations

from pathlib import Path

import pytest
from testlib import tmpfs

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


def _numeric_keys() -> list[tuple[str, type]]:
    import dataclasses
    import typing
    out = []
    for sec in dataclasses.fields(config.Config):
        section = typing.get_type_hints(config.Config)[sec.name]
        if dataclasses.is_dataclass(section):
            hints = typing.get_type_hints(section)
            out += [(f"{sec.name}.{f.name}", float if hints[f.name] == float | config.Schedule else hints[f.name])
                    for f in dataclasses.fields(section) if hints[f.name] in (int, float, float | config.Schedule)]
    return out


@pytest.mark.parametrize("key, tp", _numeric_keys(), ids=[k for k, _ in _numeric_keys()])
def test_every_number_is_bounded(key: str, tp: type) -> None:
    """No number passes validation only to overflow later (lr=1e300, seed=2**70): every key, present
    or added later, has an upper and a lower bound, its own or the generic one (a schedule's values too)."""
    for huge in ((2**70, -(2**70)) if tp is int else (1e300, -1e300)):
        with pytest.raises(ConfigError, match=rf"config: {key}=.* is out of range \(must be [<>]=? "):
            config.load(None, [f"{key}={huge}"])
        if tp is float and key in SCHEDULED:
            with pytest.raises(ConfigError, match=rf"config: {key}.end=.* is out of range \(must be [<>]=? "):
                config.load(None, [f"{key}.value={SCHEDULED[key]}", f"{key}.kind=poly", f"{key}.end={huge}"])


#: The keys that take a schedule, each with a value inside its bounds.
SCHEDULED = {"optim.momentum": 0.9, "kfac.damping": 1e-3, "kfac.kl_clip": 1e-3, "kfac.stat_decay": 0.9}


def test_yaml_file_shapes_and_duplicates(tmp_path: Path) -> None:
    cases = {
        b"- a\n": "must be a mapping of sections (data:, model:, optim:, ...), not a list",
        b"42\n": "not a int",
        b"": "is empty",
        b"---\n# only a comment\n": "is empty",
        b"optim:\n  lr: 0.1\xe9\n": "is not UTF-8 text (byte 0xe9 on line 2)",
        b"a: &x {b: 1}\nkfac:\n  skip: [x]\n  skip: [y]\n": "sets kfac.skip twice (lines 3 and 4)",
        b"data:\n  batch_size: 1" + b"0" * 5000 + b"\n": "has a value YAML cannot convert",
    }
    for i, (content, message) in enumerate(cases.items()):
        path = tmp_path / f"c{i}.yaml"
        path.write_bytes(content)
        with pytest.raises(ConfigError) as info:
            config.load(path)
        assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_same_key_in_different_sections_is_not_a_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("comm:\n  bucket_mb: 10\nkfac:\n  bucket_mb: 20\n")
    cfg = config.load(path)
    assert (cfg.comm.bucket_mb, cfg.kfac.bucket_mb) == (10.0, 20.0)


def test_output_directory_is_checked(tmp_path: Path) -> None:
    ok = config.load(None, [f"output.dir={tmp_path}/new/runs", "output.name=a"])
    config.check_output(ok)
    assert (tmp_path / "new/runs").is_dir() and list((tmp_path / "new/runs").iterdir()) == []  # probe removed
    (tmp_path / "file").write_text("")
    for overrides, message in (
            ([f"output.dir={tmp_path}/file/runs"], "cannot be created: Not a directory"),
            ([f"output.dir={tmp_path}/file"], "is not a directory"),
            (["output.name=" + "é" * 200], "is 400 bytes long; the file system of output.dir="),
            (["output.name=a/b"], "must be a plain directory name"),
            (["output.name=a\0b"], "must be a plain directory name"),
            (["output.name=.."], "must be a plain directory name")):
        cfg = config.load(None, [f"output.dir={tmp_path}", *overrides])
        with pytest.raises(ConfigError, match=message):
            config.check_output(cfg)


def test_read_only_output_directory_is_refused(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mnt:
        with pytest.raises(ConfigError, match="is not writable: Read-only file system"):
            config.check_output(config.load(None, [f"output.dir={mnt}"]))
