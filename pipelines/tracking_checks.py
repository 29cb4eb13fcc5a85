"""Can MLflow use the tracking URI? One-line answers before any work starts: an unknown scheme,
a folder store, a malformed URI, an SQLite file MLflow cannot open or create, a missing database
driver, a server that does not answer or is not MLflow, and a copied repo's embedded store."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

from pipelines.errors import PipelineError
from pipelines.guards import check_writable
from pipelines.timeouts import connect_timeout_s, network_timeout_s
from pipelines.tracking import Store, client, masked

# Schemes MLflow's tracking store takes: a database through SQLAlchemy, a tracking server, or
# Databricks. A plain path or file: is its folder store, refused by MLflow 3 unless
# MLFLOW_ALLOW_FILE_STORE=true.
_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")


_EXAMPLE = "e.g. sqlite:////abs/path/mlflow.db (four slashes) or http://127.0.0.1:5000"


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


_SQLITE_HEADER = b"SQLite format 3\x00"


# An MLflow REST endpoint that needs no experiment to exist: MLflow answers it with JSON
# holding "experiment" (200) or "error_code" (404), which no other web server does.
_PROBE = "/api/2.0/mlflow/experiments/get-by-name"


def check_reachable(s: Store) -> None:
    """Fail fast, in one line naming the URI, what is wrong and what to do, when MLflow could
    not use the tracking URI: an unknown scheme, a folder store, a malformed URI, an SQLite file
    it cannot open or create, a database driver that is missing, or a server that does not
    answer or is not MLflow. Every stage calls this before it starts work, so it is also where
    the embedded default store of a moved or copied repo is refused."""
    where = f"{s.named_by} {masked(s.uri)}"
    problem = _uri_problem(s.uri, s.experiment, where)
    if problem is not None:
        raise PipelineError(f"{where}: {problem}")
    check_store_location(s)


def _uri_problem(uri: str, experiment: str, where: str) -> str | None:
    match = _SCHEME.match(uri)
    scheme = match.group(1).lower() if match else ""
    base = scheme.split("+")[0]
    if uri == "databricks" or scheme == "databricks":
        return None  # Databricks' own credentials; nothing to check without them
    if uri in ("databricks-uc", "uc") or scheme in ("databricks-uc", "uc"):
        return (
            "is a Unity Catalog model registry, which MLflow cannot use as a tracking store; "
            f"use databricks or another tracking store, {_EXAMPLE}"
        )
    if scheme in ("", "file"):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("true", "1"):
            return None
        path = Path(url2pathname(uri.removeprefix("file://").removeprefix("file:")))
        if path.suffix in (".db", ".sqlite", ".sqlite3") or path.is_file():
            # A database file given as a path: MLflow would take it for a folder store.
            return (
                f"is a file path, which MLflow reads as a folder store; an SQLite database is "
                f"named sqlite:///{path.expanduser().resolve()}: set that instead"
            )
        return (
            "is a folder store (a plain path or file:), which MLflow 3 refuses unless "
            "MLFLOW_ALLOW_FILE_STORE=true; use a database instead, e.g. "
            "sqlite:////abs/path/mlflow.db, or set MLFLOW_ALLOW_FILE_STORE=true"
        )
    if base == "sqlite":
        return _sqlite_problem(uri, where)
    if base in _DATABASES:
        return _database_problem(uri)
    if scheme in ("http", "https"):
        return _server_problem(uri, experiment)
    return (
        f"scheme '{scheme}' is not one MLflow can track to (sqlite, postgresql, mysql, mssql, "
        f"http, https, databricks); {_EXAMPLE}"
    )


def _sqlite_problem(uri: str, where: str) -> str | None:
    rest = uri.split(":", 1)[1]
    path = rest.removeprefix("///").partition("?")[0]
    if rest in ("//", "///") or path == ":memory:":
        return (
            "is an in-memory database, lost when the command ends and unseen by Ray workers; "
            "name a file, e.g. sqlite:////abs/path/mlflow.db"
        )
    if not rest.startswith("///"):
        return (
            "is not an SQLite URL MLflow can open; write sqlite:/// and the database file's "
            "path, e.g. sqlite:////abs/path/mlflow.db (four slashes for an absolute path)"
        )
    if path.startswith("file:"):
        return None  # SQLite's own URI form (?uri=true): left to SQLite
    db = Path(path)
    if db.is_dir():
        return f"{db} is a folder; name a database file in it, e.g. sqlite:///{db / 'mlflow.db'}"
    if not db.parent.is_dir():
        what = "is a file" if db.parent.exists() else "does not exist"
        return (
            f"the database's folder {db.parent} {what}; create that folder or fix the path in "
            "the URI"
        )
    if db.is_file() and db.stat().st_size and not _is_sqlite(db):
        return (
            f"{db} is not an SQLite database; point the URI at MLflow's database or at a new "
            "file name"
        )
    check_writable(db.parent, where)  # SQLite writes a journal beside the database
    return None


def _is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(_SQLITE_HEADER)) == _SQLITE_HEADER
    except OSError:
        return True  # unreadable: let SQLite say why, the check is for other kinds of file


# A database server must take a connection within pipelines.timeouts' connect deadline:
# MLflow's own connect retries a dead one for about 100 s and then fails with a traceback.
_TIMEOUT_ARG = {"postgresql": "connect_timeout", "mysql": "connect_timeout", "mssql": "timeout"}


def _database_problem(uri: str) -> str | None:
    """A server database (through SQLAlchemy): a URI SQLAlchemy parses, a driver that is
    installed, and a server that takes one connection within connect_timeout_s()."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(uri)
        dialect = url.get_dialect()
    except NoSuchModuleError as exc:
        return (
            f"{exc}; use a driver SQLAlchemy knows, e.g. postgresql+psycopg2:// or mysql+pymysql://"
        )
    except (ArgumentError, ValueError) as exc:
        return f"is not a valid database URL ({str(exc)[:120]}); {_EXAMPLE}"
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        return (
            f"needs the Python database driver '{exc.name or url.drivername}', which is not "
            "installed; install it into this environment (e.g. pip install psycopg2-binary "
            "with postgresql+psycopg2://, pymysql with mysql+pymysql://)"
        )
    return _connect_problem(url)


def _connect_problem(url) -> str | None:
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    arg = _TIMEOUT_ARG.get(url.get_backend_name())
    engine = create_engine(
        url,
        poolclass=NullPool,
        connect_args={arg: max(1, round(connect_timeout_s()))} if arg else {},
    )
    try:
        with engine.connect():
            return None
    except SQLAlchemyError as exc:
        # The driver's own words (refused, timed out, no such database, authentication
        # failed), which never hold the password; SQLAlchemy's wrapper text adds a URL.
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())[:200]
        return (
            f"cannot be reached ({reason}); start the database server or fix the URI's host, "
            "port, user, password or database name"
        )
    finally:
        engine.dispose()


def _server_problem(uri: str, experiment: str) -> str | None:
    import requests

    try:
        host = urlsplit(uri).hostname
        urlsplit(uri).port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError as exc:
        return f"is not a valid URL ({exc}); e.g. http://127.0.0.1:5000"
    if not host:
        return "names no host; e.g. http://127.0.0.1:5000"
    try:
        answer = requests.get(
            uri.rstrip("/") + _PROBE,
            params={"experiment_name": experiment},
            timeout=(connect_timeout_s(), network_timeout_s()),
            **_request_auth(),
        )
    except requests.RequestException as exc:
        return (
            f"is unreachable ({type(exc).__name__}); start the MLflow server "
            "(python infra/local/stack.py up) or give the address of a running one"
        )
    if answer.status_code in (401, 403) and not os.environ.get("MLFLOW_TRACKING_AUTH"):
        return (
            f"refused the request (HTTP {answer.status_code}); set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to credentials it accepts"
        )
    try:
        body = answer.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and ("experiment" in body or "error_code" in body):
        if answer.status_code >= 500:
            why = str(body.get("message", "")).splitlines()[0][:200] if body.get("message") else ""
            return f"is an MLflow server but failed (HTTP {answer.status_code}: {why}); see its log"
        return None
    kind = answer.headers.get("Content-Type", "no content type").split(";")[0]
    return (
        f"answers, but not as an MLflow tracking server (GET {_PROBE} gave HTTP "
        f"{answer.status_code}, {kind}); use the address `mlflow server` listens on, e.g. "
        "http://127.0.0.1:5000"
    )


def _request_auth() -> dict[str, Any]:
    """The credentials and TLS settings MLflow's own client would send (its environment
    variables); user:password@ in the URI is sent by requests itself."""
    out: dict[str, Any] = {}
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        out["headers"] = {"Authorization": f"Bearer {token}"}
    elif (user := os.environ.get("MLFLOW_TRACKING_USERNAME")) is not None:
        out["auth"] = (user, os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("true", "1"):
        out["verify"] = False
    elif cert := os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        out["verify"] = cert
    return out


def check_store_location(s: Store) -> None:
    """With the embedded default store only: refuse a mlflow.db whose experiment records its
    artifacts outside this folder (the repo was moved or copied). Asked through MLflow's
    client; a store the user named (params or $MLFLOW_TRACKING_URI) or a server is theirs."""
    db, here = s.default_db, s.artifact_location
    if db is None or here is None or not db.is_file() or not db.stat().st_size:
        return  # named by the user, or no store yet: MLflow creates it with this folder's paths
    exp = client(s).get_experiment_by_name(s.experiment)
    recorded = None if exp is None else exp.artifact_location
    if recorded in (None, here) or _same_store(recorded, db):
        return
    raise PipelineError(
        f"{db} records its artifacts in {_local_path(recorded)}, not in this folder: the repo "
        "was moved or copied, and MLflow's embedded store cannot follow it. Move the repo "
        "back, or move mlflow.db and mlartifacts aside to start a new store here, or set "
        "mlflow.tracking_uri to an MLflow server"
    )


def _same_store(recorded: str, db: Path) -> bool:
    """Another path to this same database (a hard link or bind mount) reaches these files."""
    try:
        return os.path.samefile(_local_path(recorded).parent / "mlflow.db", db)
    except OSError:
        return False


def _local_path(file_uri: str) -> Path:
    return Path(url2pathname(urlsplit(file_uri).path))
