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
]
SCHEMA_VERSION = len(MIGRATIONS)
BUSY_TIMEOUT_S = 60.0
"""How long a writer waits for another process's transaction before giving up."""

KEY = ("run", "step", "matrix", "approximation", "estimator", "seed")


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
        gap = None if self.train_acc is None or self.val_acc is None else self.train_acc - self.val_acc
        object.__setattr__(self, "gap", gap)


COLUMNS = tuple(f.name for f in fields(SpectrumRow))


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
        values["hparams"] = json.dumps(row.hparams, sort_keys=True)
        values["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        names = ", ".join(values)
        marks = ", ".join(f":{name}" for name in values)
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        try:
            self._conn.execute(f"{verb} INTO spectra ({names}) VALUES ({marks})", values)
        except sqlite3.IntegrityError:
            key = " ".join(f"{name}={values[name]!r}" for name in KEY)
            raise UserError(f"analysis: {self.path} already holds {key}; replace it or skip it") from None

    def has(self, run: str, step: int, matrix: str, approximation: str, estimator: str | None, seed: int) -> bool:
        """Whether the result of this key is stored (``estimator`` None: by any estimator; ``spngd
        analyze`` asks so, since ``auto`` resolves only when computed): a resumed analysis skips it."""
        values = dict(zip(KEY, (run, step, matrix, approximation, estimator, seed)))
        if estimator is None:
            del values["estimator"]
        where = " AND ".join(f"{name} = ?" for name in values)
        found = self._conn.execute(f"SELECT 1 FROM spectra WHERE {where} LIMIT 1", tuple(values.values()))
        return found.fetchone() is not None

    def rows(self, *, run: str | None = None, matrix: str | None = None, approximation: str | None = None,
             estimator: str | None = None, dataset: str | None = None, model: str | None = None,
             ) -> list[SpectrumRow]:
        """The stored results matching every filter given, ordered by run, step (then insertion)."""
        filters = {"run": run, "matrix": matrix, "approximation": approximation, "estimator": estimator,
                   "dataset": dataset, "model": model}
        given = {name: value for name, value in filters.items() if value is not None}
        where = " AND ".join(f"{name} = :{name}" for name in given) or "1"
        selected = ", ".join(c for c in COLUMNS if c != "gap")
        cursor = self._conn.execute(f"SELECT {selected} FROM spectra WHERE {where} ORDER BY run, step, id", given)
        names = [d[0] for d in cursor.description]
        result = []
        for record in cursor:
            values = dict(zip(names, record))
            values["eigenvalues"] = tuple(json.loads(values["eigenvalues"]))
            values["hparams"] = json.loads(values["hparams"])
            result.append(SpectrumRow(**values))
        return result

    def count(self) -> int:
        """How many results are stored."""
        return int(self._conn.execute("SELECT COUNT(*) FROM spectra").fetchone()[0])

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
