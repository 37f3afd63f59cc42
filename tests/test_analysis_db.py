"""The spectra database: migrations, refusals, the unique key, filters, exact floats, concurrent writers."""

from __future__ import annotations

import dataclasses
import math
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from app.analysis import db
from app.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def make_row(**overrides: Any) -> db.SpectrumRow:
    values: dict[str, Any] = dict(
        run="r", step=0, epoch=0.0, dataset="mnist5k", model="mlp", matrix="ggn", approximation="full",
        estimator="dense", k=3, eigenvalues=(3.0, 2.0, 1.0), trace=6.0, trace_estimator="exact", tolerance=0.0,
        seed=0, examples=128, train_loss=0.5, train_acc=0.9, val_loss=0.7, val_acc=0.8, params=1000,
        hparams={"lr": 0.1, "width": 32}, git_commit="abc", seconds=0.25)
    values.update(overrides)
    return db.SpectrumRow(**values)


def make_snapshot(**overrides: Any) -> db.SnapshotRow:
    values: dict[str, Any] = dict(
        run="r", step=0, epoch=0.0, dataset="mnist5k", model="mlp", params=1000, examples=128, train_loss=0.5,
        train_acc=0.9, val_loss=0.7, val_acc=0.8, hparams={"lr": 0.1, "width": 32}, param_norm=3.5, path_norm=12.0,
        fisher_rao_norm=0.25, pacbayes_sigma=0.05, pacbayes_flatness=400.0, seed=0, git_commit="abc", seconds=1.5)
    values.update(overrides)
    return db.SnapshotRow(**values)


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def test_create_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "curvature.sqlite"  # parent directories are created
    with db.open_db(path) as d:
        d.insert(make_row())
    assert user_version(path) == db.SCHEMA_VERSION == len(db.MIGRATIONS)
    with db.open_db(path) as d:  # reopening migrates nothing and keeps the data
        assert d.count() == 1
    assert user_version(path) == db.SCHEMA_VERSION
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_older_version_migrates(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 0")
    conn.execute("VACUUM")  # the file exists, version 0, no table
    conn.close()
    assert path.stat().st_size > 0 and user_version(path) == 0
    with db.open_db(path) as d:
        assert d.count() == 0
        d.insert(make_row())
        assert d.rows() == [make_row()]
    assert user_version(path) == db.SCHEMA_VERSION


def test_a_new_migration_applies_to_a_current_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.sqlite"
    db.open_db(path).close()
    monkeypatch.setattr(db, "MIGRATIONS", [*db.MIGRATIONS, "ALTER TABLE spectra ADD COLUMN note TEXT;"])
    monkeypatch.setattr(db, "SCHEMA_VERSION", len(db.MIGRATIONS))
    db.open_db(path).close()
    assert user_version(path) == db.SCHEMA_VERSION
    with sqlite3.connect(path) as conn:
        assert "note" in [c[1] for c in conn.execute("PRAGMA table_info(spectra)")]


def test_a_failing_migration_leaves_the_db_at_its_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.sqlite"
    db.open_db(path).close()
    broken = "CREATE TABLE half (x INTEGER); INSERT INTO missing VALUES (1);"
    monkeypatch.setattr(db, "MIGRATIONS", [*db.MIGRATIONS, broken])
    monkeypatch.setattr(db, "SCHEMA_VERSION", len(db.MIGRATIONS))
    with pytest.raises(UserError, match="no such table: missing"):
        db.open_db(path)
    assert user_version(path) == len(db.MIGRATIONS) - 1
    with sqlite3.connect(path) as conn:  # the migration's first statement was rolled back with it
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'half'").fetchone() is None


def test_a_v1_database_migrates_to_v2_keeping_its_spectra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "v1.sqlite"
    with monkeypatch.context() as m:  # the code of schema version 1: the spectra table only
        m.setattr(db, "MIGRATIONS", db.MIGRATIONS[:1])
        m.setattr(db, "SCHEMA_VERSION", 1)
        with db.open_db(path) as d:
            d.insert(make_row())
            d.insert(make_row(step=3, trace=5.0))
    assert user_version(path) == 1
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'snapshots'").fetchone() is None
    with db.open_db(path) as d:
        assert user_version(path) == db.SCHEMA_VERSION >= 2
        assert d.rows() == [make_row(), make_row(step=3, trace=5.0)]
        assert d.count("snapshots") == 0
        d.insert_snapshot(make_snapshot())
        assert d.snapshots() == [make_snapshot()]


def test_snapshots_key_filters_and_round_trip(tmp_path: Path) -> None:
    with db.open_db(tmp_path / "s.sqlite") as d:
        stored = [make_snapshot(run="b", step=4, dataset="digits"), make_snapshot(run="a", step=9, model="cnn"),
                  make_snapshot(run="a", step=2, path_norm=math.pi * 1e10, fisher_rao_norm=1 / 3),
                  make_snapshot(run="a", step=2, seed=1, val_acc=None, pacbayes_sigma=None, pacbayes_flatness=None)]
        for row in stored:
            d.insert_snapshot(row)
        b4, a9, a2, a2s1 = stored
        assert d.snapshots() == [a2, a2s1, a9, b4] and d.count("snapshots") == 4 and d.count() == 0
        assert d.snapshots(run="a", model="cnn") == [a9]
        assert d.snapshots(dataset="digits") == [b4]
        assert d.snapshots()[0].path_norm.hex() == (math.pi * 1e10).hex()  # type: ignore[union-attr]
        assert d.snapshots()[0].gap == 0.9 - 0.8 and d.snapshots()[1].gap is None
        assert d.has_snapshot("a", 2, 1) and d.has_snapshot("b", 4, 0)
        assert not d.has_snapshot("a", 2, 2) and not d.has_snapshot("a", 3, 0) and not d.has_snapshot("c", 2, 0)
        with pytest.raises(UserError) as info:
            d.insert_snapshot(make_snapshot(run="a", step=9, param_norm=1.0))
        assert "already holds run='a' step=9 seed=0" in str(info.value) and "\n" not in str(info.value)
        d.insert_snapshot(make_snapshot(run="a", step=9, param_norm=1.0), replace=True)
        assert [row.param_norm for row in d.snapshots(run="a")] == [3.5, 3.5, 1.0]
        d.insert_snapshot(make_snapshot(run="n", path_norm=math.nan))
        assert d.snapshots(run="n")[0].path_norm is None  # SQLite's NULL


def test_newer_version_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {db.SCHEMA_VERSION + 1}")
    with pytest.raises(UserError) as info:
        db.open_db(path)
    assert str(info.value) == (f"analysis: {path} has schema version {db.SCHEMA_VERSION + 1}; "
                               f"this spngd knows up to {db.SCHEMA_VERSION}")


def test_not_a_database_refused(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sqlite"
    path.write_bytes(b"this is not a SQLite file\n" * 100)
    with pytest.raises(UserError) as info:
        db.open_db(path)
    message = str(info.value)
    assert message.startswith(f"analysis: {path} ") and "not a database" in message and "\n" not in message
    with pytest.raises(UserError, match="^analysis: cannot open") as info:
        db.open_db(tmp_path)  # a directory
    assert "\n" not in str(info.value)


def test_duplicate_key_refused_and_replace(tmp_path: Path) -> None:
    with db.open_db(tmp_path / "d.sqlite") as d:
        d.insert(make_row())
        d.insert(make_row(seed=1))  # another key
        with pytest.raises(UserError) as info:
            d.insert(make_row(trace=7.0))
        message = str(info.value)
        assert "already holds run='r' step=0 matrix='ggn' approximation='full' estimator='dense' seed=0" in message
        assert "\n" not in message
        assert d.count() == 2 and d.rows(run="r")[0].trace == 6.0
        d.insert(make_row(trace=7.0), replace=True)
        assert d.count() == 2
        assert sorted(row.trace for row in d.rows()) == [6.0, 7.0]


def test_has_for_resume(tmp_path: Path) -> None:
    with db.open_db(tmp_path / "h.sqlite") as d:
        d.insert(make_row(step=5, matrix="hessian", approximation="kfac", estimator="lanczos", seed=3))
        assert d.has("r", 5, "hessian", "kfac", "lanczos", 3)
        for other in [("q", 5, "hessian", "kfac", "lanczos", 3), ("r", 6, "hessian", "kfac", "lanczos", 3),
                      ("r", 5, "ggn", "kfac", "lanczos", 3), ("r", 5, "hessian", "diag", "lanczos", 3),
                      ("r", 5, "hessian", "kfac", "dense", 3), ("r", 5, "hessian", "kfac", "lanczos", 4)]:
            assert not d.has(*other), other


def test_rows_filters_and_order(tmp_path: Path) -> None:
    stored = [make_row(run=run, step=step, matrix=matrix, approximation=approx, dataset=data, model=model,
                       estimator=est)
              for run, step, matrix, approx, data, model, est in [
                  ("b", 2, "ggn", "full", "digits", "cnn", "dense"),
                  ("a", 9, "hessian", "kfac", "mnist5k", "mlp", "lanczos"),
                  ("b", 1, "hessian", "full", "digits", "mlp", "dense"),
                  ("a", 3, "ggn", "full", "mnist5k", "mlp", "dual")]]
    with db.open_db(tmp_path / "f.sqlite") as d:
        for row in stored:
            d.insert(row)
        a9, b2, b1, a3 = stored[1], stored[0], stored[2], stored[3]
        assert d.rows() == [a3, a9, b1, b2]
        assert d.rows(run="b") == [b1, b2]
        assert d.rows(matrix="hessian") == [a9, b1]
        assert d.rows(approximation="full") == [a3, b1, b2]
        assert d.rows(estimator="dual") == [a3]
        assert d.rows(dataset="digits", model="mlp") == [b1]
        assert d.rows(run="a", matrix="ggn", approximation="full") == [a3]
        assert d.rows(model="resnet8") == []


def test_floats_round_trip_exactly(tmp_path: Path) -> None:
    eig = (math.pi * 1e10, 1 / 3, 0.1 + 0.2, math.nextafter(1e-7, 0.0), 1e-300, 5e-324, -0.0, -math.e)
    row = make_row(eigenvalues=eig, k=10, trace=sum(eig), tolerance=1e-9 / 7, epoch=2 / 3, train_loss=math.sqrt(2),
                   train_acc=0.7, val_acc=0.6000000000000001, hparams={"lr": 0.1 + 0.2, "nested": [1e-300, "x"]})
    with db.open_db(tmp_path / "x.sqlite") as d:
        d.insert(row)
        [back] = d.rows()
    assert back == row
    assert [x.hex() for x in back.eigenvalues] == [x.hex() for x in eig]  # bit for bit, the sign of -0.0 too
    assert back.hparams["lr"].hex() == (0.1 + 0.2).hex()
    assert back.gap == 0.7 - 0.6000000000000001


def test_gap_is_stored_and_none_without_an_accuracy(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite"
    with db.open_db(path) as d:
        d.insert(make_row(train_acc=0.95, val_acc=0.75))
        d.insert(make_row(step=1, val_acc=None, val_loss=None))
        assert [row.gap for row in d.rows()] == [0.95 - 0.75, None]
    with sqlite3.connect(path) as conn:  # a query can select on the column itself
        assert conn.execute("SELECT gap FROM spectra ORDER BY step").fetchall() == [(0.95 - 0.75,), (None,)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_row().gap = 0.0  # type: ignore[misc]


def test_eigenvalues_must_be_descending() -> None:
    with pytest.raises(ValueError, match="descending"):
        make_row(eigenvalues=(1.0, 2.0))


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from tests.test_analysis_db import make_row
    from app.analysis import db
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.005)
    with db.open_db(sys.argv[1]) as d:  # both open a db that does not exist yet: both migrate it
        for step in range(50):
            d.insert(make_row(run=sys.argv[4], step=step))
""")


def test_two_writers(tmp_path: Path) -> None:
    path, go = tmp_path / "shared" / "c.sqlite", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(go), str(ROOT), f"w{i}"], env=env,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
    go.touch()
    for writer in writers:
        _, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err
    with db.open_db(path) as d:
        assert d.count() == 100
        assert [row.step for row in d.rows(run="w0")] == list(range(50))
        assert [row.step for row in d.rows(run="w1")] == list(range(50))


def test_git_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    assert db.git_commit(ROOT) == head.stdout.strip()
    assert len(db.git_commit(ROOT)) == 40
    assert db.git_commit(tmp_path) == ""  # not a checkout
    monkeypatch.setenv("PATH", str(tmp_path))  # no git
    assert db.git_commit(ROOT) == ""
