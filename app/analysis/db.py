"""The spectra database: one SQLite file (standard library ``sqlite3``) that every analysis of every
run writes into, so that one query can compare curvature across datasets, models, matrices,
approximations and training time, and relate it to generalisation.

Table ``spectra``, one row per result (one matrix under one approximation by one estimator at one
training step of one run):

=================  =======  ==================================================================
column             type     meaning (units)
=================  =======  ==================================================================
id                 INTEGER  row key (assigned by SQLite)
run                TEXT     the run's name (its run directory's name); part of the unique key
step               INTEGER  optimiser steps taken when the matrix was measured; part of the key
epoch              REAL     epochs completed at that step (fractional mid-epoch)
dataset            TEXT     the ``data.dataset`` the matrix averages over
model              TEXT     the ``model.name``
matrix             TEXT     ``hessian``, ``ggn`` (= exact Fisher), ``mc`` (MC Fisher), ``emp``
                            (empirical Fisher) or ``cov`` (gradient covariance); part of the key
approximation      TEXT     ``full``, ``block``, ``kfac`` or ``diag``; part of the key
estimator          TEXT     how the eigenvalues were obtained, as ``spectra.Spectrum`` names it
                            (``dense``, ``lanczos``, ``dual``, ``kronecker``, ``exact``, or a
                            ``+``-joined mix across blocks); part of the key
k                  INTEGER  eigenvalues asked for (fewer are stored when the matrix is smaller)
eigenvalues        TEXT     JSON list of the top eigenvalues, descending (loss units per
                            parameter squared), each float written by ``repr`` so it reads back
                            bit for bit
trace              REAL     the trace of the matrix (sum of all its eigenvalues)
trace_estimator    TEXT     ``exact`` or ``hutchinson<probes>`` (``+``-joined across blocks)
tolerance          REAL     the eigen-solver's relative tolerance (0 for exact estimators)
seed               INTEGER  the seed of the start vector, probes and MC labels; part of the key
examples           INTEGER  N, the examples the matrix averages over (all ranks together)
train_loss         REAL     mean cross-entropy on the training set at that step (nats); NULL if
                            not measured
train_acc          REAL     training accuracy, a fraction in [0, 1]; NULL if not measured
val_loss           REAL     mean cross-entropy on the validation set (nats); NULL if not measured
val_acc            REAL     validation accuracy, a fraction in [0, 1]; NULL if not measured
gap                REAL     generalisation gap train_acc - val_acc, stored so that queries need not
                            recompute it; NULL when either is NULL
params             INTEGER  P, the network's trainable parameters
hparams            TEXT     JSON object of the hyperparameters that vary across the grid (lr,
                            batch, width, depth, weight decay, ...)
git_commit         TEXT     ``git rev-parse HEAD`` of the code that computed the row; empty when
                            it did not run from a git checkout
created            TEXT     when the row was written, UTC ISO 8601 (``2026-01-31T12:00:00+00:00``)
seconds            REAL     wall-clock seconds the estimate took
=================  =======  ==================================================================

``UNIQUE(run, step, matrix, approximation, estimator, seed)``: a resumed analysis asks ``has`` and
skips what is done; writing the same result twice is refused unless asked to replace it. Index on
``(run, matrix, approximation)``, the usual query. SQLite stores a NaN REAL as NULL: a diverged
run's loss reads back as None.

Table ``snapshots`` (schema version 2), one row per measured model snapshot (one training step of one
run): what the generalisation measures (``app.analysis.measures``) need beside the spectra. The
columns run ... gap, hparams, seed, git_commit, created and seconds mean what they mean in
``spectra`` (``seconds``: the measures' wall-clock time); ``examples`` is N, the training examples
the Fisher-Rao norm and the PAC-Bayes search average over. The measures
(``measures.snapshot_norms`` defines each):

=================  =======  ==================================================================
column             type     meaning (units)
=================  =======  ==================================================================
param_norm         REAL     L2 norm of all trainable parameters
path_norm          REAL     path norm (Neyshabur et al. 2015): sqrt of the summed outputs of the
                            network with squared parameters on an all-ones input
fisher_rao_norm    REAL     theta^T F theta, F the exact Fisher (= GGN) over the N examples
                            (Liang et al. 2019's squared Fisher-Rao norm; nats)
pacbayes_sigma     REAL     sigma', the largest isotropic Gaussian weight noise whose expected
                            training accuracy drops by at most 0.1 (parameter units)
pacbayes_flatness  REAL     1 / sigma'^2 (Jiang et al. 2020's ``pacbayes.flatness``)
=================  =======  ==================================================================

``UNIQUE(run, step, seed)``: ``has_snapshot`` lets a resumed analysis skip a measured snapshot.

Migrations: ``MIGRATIONS[i]`` is the SQL script that brings a database from ``PRAGMA user_version``
i to i + 1, and ``SCHEMA_VERSION = len(MIGRATIONS)``. ``open_db`` applies the pending ones in
order, each in one transaction together with its version bump, so a crash leaves a database at a
version boundary. A schema change appends a migration; a released one is never edited (databases
in the field already ran it). A database newer than the code is refused rather than misread.

Several processes (an array job's tasks) may write one file: WAL mode lets readers run beside the
one writer, each insert is its own short transaction, and a busy timeout makes a writer wait its
turn instead of failing.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from app.errors import UserError

MIGRATIONS: list[str] = [
    """
    CREATE TABLE spectra (
        id INTEGER PRIMARY KEY,
        run TEXT NOT NULL,
        step INTEGER NOT NULL,
        epoch REAL,
        dataset TEXT,
        model TEXT,
        matrix TEXT NOT NULL,
        approximation TEXT NOT NULL,
        estimator TEXT NOT NULL,
        k INTEGER,
        eigenvalues TEXT NOT NULL,
        trace REAL,
        trace_estimator TEXT,
        tolerance REAL,
        seed INTEGER NOT NULL,
        examples INTEGER,
        train_loss REAL,
        train_acc REAL,
        val_loss REAL,
        val_acc REAL,
        gap REAL,
        params INTEGER,
        hparams TEXT,
        git_commit TEXT,
        created TEXT NOT NULL,
        seconds REAL,
        UNIQUE (run, step, matrix, approximation, estimator, seed)
    );
    CREATE INDEX spectra_run_matrix_approximation ON spectra (run, matrix, approximation);
    """,
    """
    CREATE TABLE snapshots (
        id INTEGER PRIMARY KEY,
        run TEXT NOT NULL,
        step INTEGER NOT NULL,
        epoch REAL,
        dataset TEXT,
        model TEXT,
        params INTEGER,
        examples INTEGER,
        train_loss REAL,
        train_acc REAL,
        val_loss REAL,
        val_acc REAL,
        gap REAL,
        hparams TEXT,
        param_norm REAL,
        path_norm REAL,
        fisher_rao_norm REAL,
        pacbayes_sigma REAL,
        pacbayes_flatness REAL,
        seed INTEGER NOT NULL,
        git_commit TEXT,
        created TEXT NOT NULL,
        seconds REAL,
        UNIQUE (run, step, seed)
    );
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
BUSY_TIMEOUT_S = 60.0
"""How long a writer waits for another process's transaction before giving up."""

KEY = ("run", "step", "matrix", "approximation", "estimator", "seed")
SNAPSHOT_KEY = ("run", "step", "seed")


def _gap(train_acc: float | None, val_acc: float | None) -> float | None:
    return None if train_acc is None or val_acc is None else train_acc - val_acc


@dataclass(frozen=True, kw_only=True)
class SpectrumRow:
    """One result as stored (every column but ``id`` and ``created``); ``gap`` follows the accuracies."""

    run: str
    step: int
    epoch: float
    dataset: str
    model: str
    matrix: str
    approximation: str
    estimator: str
    k: int
    eigenvalues: tuple[float, ...]
    trace: float
    trace_estimator: str
    tolerance: float
    seed: int
    examples: int
    train_loss: float | None
    train_acc: float | None
    val_loss: float | None
    val_acc: float | None
    params: int
    hparams: dict[str, Any]
    git_commit: str
    seconds: float
    gap: float | None = field(init=False)

    def __post_init__(self) -> None:
        if any(a < b for a, b in zip(self.eigenvalues, self.eigenvalues[1:])):
            raise ValueError(f"eigenvalues must be descending, got {self.eigenvalues}")
        object.__setattr__(self, "gap", _gap(self.train_acc, self.val_acc))


@dataclass(frozen=True, kw_only=True)
class SnapshotRow:
    """One measured snapshot as stored in ``snapshots`` (every column but ``id`` and ``created``); a
    measure is None when it was not computed or read back NaN (SQLite's NULL)."""

    run: str
    step: int
    epoch: float
    dataset: str
    model: str
    params: int
    examples: int
    train_loss: float | None
    train_acc: float | None
    val_loss: float | None
    val_acc: float | None
    hparams: dict[str, Any]
    param_norm: float | None
    path_norm: float | None
    fisher_rao_norm: float | None
    pacbayes_sigma: float | None
    pacbayes_flatness: float | None
    seed: int
    git_commit: str
    seconds: float
    gap: float | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "gap", _gap(self.train_acc, self.val_acc))


COLUMNS = tuple(f.name for f in fields(SpectrumRow))
SNAPSHOT_COLUMNS = tuple(f.name for f in fields(SnapshotRow))


def _statements(script: str) -> Iterator[str]:
    """The complete SQL statements of a script, so that a migration runs inside our own transaction
    (``executescript`` would commit it first)."""
    buffer = ""
    for piece in script.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            if buffer.strip(" \n\t;"):
                yield buffer
            buffer = ""


def _user_version(conn: sqlite3.Connection, path: Path) -> int:
    """The database's schema version; one newer than this code is refused rather than misread."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise UserError(f"analysis: {path} has schema version {version}; this spngd knows up to {SCHEMA_VERSION}")
    return version


class Database:
    """An open spectra database (see the module docstring for the schema); use ``open_db``."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn

    def insert(self, row: SpectrumRow, *, replace: bool = False) -> None:
        """Write one result; a result already stored under its key is refused unless ``replace``."""
        values = asdict(row)
        values["eigenvalues"] = json.dumps(list(row.eigenvalues))
        self._write("spectra", values, KEY, replace)

    def insert_snapshot(self, row: SnapshotRow, *, replace: bool = False) -> None:
        """Write one snapshot's measures; one already stored under (run, step, seed) is refused unless
        ``replace``."""
        self._write("snapshots", asdict(row), SNAPSHOT_KEY, replace)

    def _write(self, table: str, values: dict[str, Any], key: tuple[str, ...], replace: bool) -> None:
        values["hparams"] = json.dumps(values["hparams"], sort_keys=True)
        values["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        names = ", ".join(values)
        marks = ", ".join(f":{name}" for name in values)
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        try:
            self._conn.execute(f"{verb} INTO {table} ({names}) VALUES ({marks})", values)
        except sqlite3.IntegrityError:
            held = " ".join(f"{name}={values[name]!r}" for name in key)
            raise UserError(f"analysis: {self.path} already holds {held}; replace it or skip it") from None

    def has(self, run: str, step: int, matrix: str, approximation: str, estimator: str | None, seed: int) -> bool:
        """Whether the result of this key is stored (``estimator`` None: by any estimator; ``spngd
        analyze`` asks so, since ``auto`` resolves only when computed): a resumed analysis skips it."""
        values = dict(zip(KEY, (run, step, matrix, approximation, estimator, seed)))
        if estimator is None:
            del values["estimator"]
        return self._exists("spectra", values)

    def has_snapshot(self, run: str, step: int, seed: int) -> bool:
        """Whether the measures of this snapshot are stored: a resumed analysis skips them."""
        return self._exists("snapshots", dict(zip(SNAPSHOT_KEY, (run, step, seed))))

    def _exists(self, table: str, values: dict[str, Any]) -> bool:
        where = " AND ".join(f"{name} = ?" for name in values)
        found = self._conn.execute(f"SELECT 1 FROM {table} WHERE {where} LIMIT 1", tuple(values.values()))
        return found.fetchone() is not None

    def rows(self, *, run: str | None = None, matrix: str | None = None, approximation: str | None = None,
             estimator: str | None = None, dataset: str | None = None, model: str | None = None,
             ) -> list[SpectrumRow]:
        """The stored results matching every filter given, ordered by run, step (then insertion)."""
        filters = {"run": run, "matrix": matrix, "approximation": approximation, "estimator": estimator,
                   "dataset": dataset, "model": model}
        result = []
        for values in self._select("spectra", COLUMNS, filters):
            values["eigenvalues"] = tuple(json.loads(values["eigenvalues"]))
            result.append(SpectrumRow(**values))
        return result

    def snapshots(self, *, run: str | None = None, dataset: str | None = None, model: str | None = None,
                  ) -> list[SnapshotRow]:
        """The stored snapshots matching every filter given, ordered by run, step (then insertion)."""
        filters = {"run": run, "dataset": dataset, "model": model}
        return [SnapshotRow(**values) for values in self._select("snapshots", SNAPSHOT_COLUMNS, filters)]

    def _select(self, table: str, columns: tuple[str, ...], filters: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The rows matching the non-None filters as column -> value, ``hparams`` decoded, ``gap``
        left out (the rows recompute it)."""
        given = {name: value for name, value in filters.items() if value is not None}
        where = " AND ".join(f"{name} = :{name}" for name in given) or "1"
        selected = ", ".join(c for c in columns if c != "gap")
        cursor = self._conn.execute(f"SELECT {selected} FROM {table} WHERE {where} ORDER BY run, step, id", given)
        names = [d[0] for d in cursor.description]
        for record in cursor:
            values = dict(zip(names, record))
            values["hparams"] = json.loads(values["hparams"])
            yield values

    def count(self, table: str = "spectra") -> int:
        """How many rows ``table`` (``spectra`` or ``snapshots``) holds."""
        if table not in ("spectra", "snapshots"):
            raise ValueError(f"analysis: no table {table!r}")
        return int(self._conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Apply the pending migrations, each in one write transaction with its version bump. The version
    is read again under the write lock: another process may have migrated meanwhile."""
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = _user_version(conn, path)
            if version == SCHEMA_VERSION:
                conn.execute("COMMIT")
                return
            for statement in _statements(MIGRATIONS[version]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def open_db(path: str | Path) -> Database:
    """Open (creating it and its parent directories if need be) and migrate the database at ``path``.

    A file that is not a SQLite database, or one from a newer spngd, is a ``UserError``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level None: each statement is its own transaction unless we BEGIN one.
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise UserError(f"analysis: cannot open {path}: {exc}") from None
    try:
        _user_version(conn, path)  # the first read (a non-database fails here), before WAL touches the file
        conn.execute("PRAGMA journal_mode = WAL")
        _migrate(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise UserError(f"analysis: {path} is not a usable spectra database: {exc}") from None
    except BaseException:
        conn.close()
        raise
    return Database(path, conn)


def git_commit(repo_dir: str | Path) -> str:
    """The commit checked out at ``repo_dir`` (``git rev-parse HEAD``); "" outside a checkout or without git."""
    try:
        done = subprocess.run(["git", "-C", str(repo_dir), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""
