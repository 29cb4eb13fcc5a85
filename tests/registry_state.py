"""What the MLflow model registry holds, as one comparable value: tests take it before and
after a fault to show that nothing was registered, moved or lost. And, for a SQLite store,
real write failures inside it and a log of what was written."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path


def registry_snapshot(tracking_uri: str) -> dict[str, object]:
    """Registered models -> their aliases and versions (number, status, source)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    out: dict[str, object] = {}
    for rm in client.search_registered_models():
        versions = client.search_model_versions(f"name='{rm.name}'")
        out[rm.name] = {
            "aliases": dict(sorted(rm.aliases.items())),
            "versions": sorted((v.version, v.status, v.source) for v in versions),
        }
    return out


# -- real faults and a write log inside an MLflow SQLite store ---------------------------------

_WRITE_LOG = "_test_write_log"


def record_writes(db: Path, table: str, entry: str) -> Callable[[], list[str]]:
    """From now on every row inserted into or updated in table appends entry (an SQL expression
    over NEW) to a log inside the store; the returned function reads it in order. It shows what
    the code under test wrote even when it was undone later (a failure's rollback)."""
    with closing(sqlite3.connect(db)) as con, con:
        con.execute(f"CREATE TABLE IF NOT EXISTS {_WRITE_LOG} (n INTEGER PRIMARY KEY, tab, entry)")
        for event in ("INSERT", "UPDATE"):
            con.execute(
                f"CREATE TRIGGER _test_log_{table}_{event.lower()} AFTER {event} ON {table} "
                f"BEGIN INSERT INTO {_WRITE_LOG} (tab, entry) VALUES ('{table}', {entry}); END"
            )

    def read() -> list[str]:
        with closing(sqlite3.connect(db)) as con:
            sql = f"SELECT entry FROM {_WRITE_LOG} WHERE tab = ? ORDER BY n"
            rows = con.execute(sql, (table,)).fetchall()
        return [row[0] for row in rows]

    return read


@contextmanager
def writes_refused(db: Path, table: str, when: str, message: str) -> Iterator[None]:
    """Inside, the SQLite store itself refuses to insert or update a row of table for which
    `when` (SQL over NEW) holds: the real MLflow call that writes it raises MlflowException
    with message, half-way through whatever the code under test was doing."""
    names = [f"_test_refuse_{table}_{event.lower()}" for event in ("INSERT", "UPDATE")]
    with closing(sqlite3.connect(db)) as con, con:
        for name, event in zip(names, ("INSERT", "UPDATE"), strict=True):
            con.execute(
                f"CREATE TRIGGER {name} BEFORE {event} ON {table} WHEN {when} "
                f"BEGIN SELECT RAISE(ABORT, '{message}'); END"
            )
    try:
        yield
    finally:
        with closing(sqlite3.connect(db)) as con, con:
            for name in names:
                con.execute(f"DROP TRIGGER IF EXISTS {name}")
