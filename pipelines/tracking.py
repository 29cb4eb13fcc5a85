"""MLflow tracking: where runs go, and one MLflow run per training run name (resumable).

Nothing here runs at import time: the tracking URI is resolved when a stage asks for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

from pipelines.atomic import atomic_write_text
from pipelines.errors import PipelineError
from pipelines.guards import check_writable
from pipelines.params import Params
from pipelines.storage import is_remote
from pipelines.timeouts import connect_timeout_s, network_timeout_s

log = logging.getLogger("vae_pipeline.tracking")
# Names of environment variables whose values must never reach MLflow params, tags or logs.
_SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIAL|AUTH)", re.IGNORECASE)
# user:password@ in a URI (a tracking server, a Ray address): logged without it.
_URI_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def tracking_uri(params: Params) -> str:
    """params.mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else SQLite beside params.yaml.

    SQLite paths are made absolute (a relative one in params.yaml is read from params.yaml's
    folder, like every other path there) because Ray workers change directory.
    """
    if params.mlflow.tracking_uri:
        return _absolute_sqlite(params.mlflow.tracking_uri, params.root)
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return _absolute_sqlite(uri, Path.cwd())
    return f"sqlite:///{params.resolve('mlflow.db')}"


def _absolute_sqlite(uri: str, base: Path) -> str:
    if not uri.startswith("sqlite:///"):
        return uri
    path, sep, query = uri.removeprefix("sqlite:///").partition("?")
    if not path or path == ":memory:" or path.startswith(("/", "file:")):
        return uri
    return f"sqlite:///{Path(os.path.abspath(base / path))}{sep}{query}"


def artifact_location(params: Params) -> str | None:
    """Local artifact root beside the SQLite file (a tracking server manages its own)."""
    uri = tracking_uri(params)
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def client(params: Params):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri(params))


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


def masked(uri: str) -> str:
    """uri without the user:password@ part, for messages and logs."""
    return _URI_USERINFO.sub("***@", uri)


def _setting(params: Params) -> str:
    if params.mlflow.tracking_uri:
        return "mlflow.tracking_uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "$MLFLOW_TRACKING_URI"
    return "tracking URI (default)"


def check_reachable(params: Params) -> None:
    """Fail fast, in one line naming the URI, what is wrong and what to do, when MLflow could
    not use the tracking URI: an unknown scheme, a folder store, a malformed URI, an SQLite file
    it cannot open or create, a database driver that is missing, or a server that does not
    answer or is not MLflow. Every stage calls this before it starts work, so it is also where
    the embedded default store of a moved or copied repo is pointed at its new folder."""
    uri = tracking_uri(params)
    where = f"{_setting(params)} {masked(uri)}"
    problem = _uri_problem(uri, params.mlflow.experiment, where)
    if problem is not None:
        raise PipelineError(f"{where}: {problem}")
    follow_moved_store(params)


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


# -- a moved or copied repo: the embedded store's artifact paths follow it --------------------

# The columns where MLflow records where a thing's artifacts are, each with the rows that hold
# one. MLflow makes every local artifact location absolute when it writes it
# (resolve_uri_if_local; a relative one is read from the current directory), so a copied
# mlflow.db would go on reading and writing the original repo's mlartifacts.
_ARTIFACT_COLUMNS = (
    ("experiments", "artifact_location", ""),
    ("runs", "artifact_uri", ""),
    ("logged_models", "artifact_location", ""),
    ("model_versions", "storage_location", ""),
    ("model_versions", "source", ""),  # a version registered from a path rather than models:/
    ("trace_tags", "value", "AND key = 'mlflow.artifactLocation'"),
)
# The experiments this pipeline creates in the embedded store have the artifact root itself as
# their location (artifact_location()): that is how the store says where it used to live.
_ROOTS_QUERY = (
    "SELECT DISTINCT artifact_location FROM experiments "
    "WHERE artifact_location GLOB 'file://*/mlartifacts'"  # GLOB: case-sensitive, like paths
)


def follow_moved_store(params: Params) -> None:
    """With the embedded default store only: when mlflow.db records its artifact root as
    <old>/mlartifacts and <old> is not the folder it now lives in (the repo was moved or
    copied), rewrite those paths to <repo>/mlartifacts in this database, in one transaction
    under a lock beside it, and say so in one line on stderr. The old folder is never opened.
    Nothing moved costs one query; a store the user named (params or $MLFLOW_TRACKING_URI) or
    a server is theirs to manage and is left alone."""
    if params.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return
    db = params.resolve("mlflow.db")
    here = artifact_location(params)
    if here is None or not db.is_file() or not db.stat().st_size:
        return  # no store yet: MLflow creates it with the right paths
    try:
        with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as conn:
            if not _old_roots(conn, db, here):
                return
    except sqlite3.Error:
        return  # not (yet) MLflow's schema, or unreadable: MLflow says why when it opens it
    from filelock import FileLock, Timeout

    try:
        with FileLock(f"{db}.relocate.lock", timeout=120):
            moved = _rewrite_roots(db, here)
    except Timeout as exc:
        raise PipelineError(
            f"another process has held {exc.lock_file} for 2 minutes while pointing {db}'s "
            "artifact paths at this folder; wait for it, or delete the lock file if no "
            "vae-pipeline command is running, and re-run"
        ) from exc
    if moved:
        _forget_artifact_repos()
    for old in moved:
        print(
            f"mlflow.db was moved from {_local_path(old).parent}; its artifact paths now point "
            f"at {_local_path(here)}",
            file=sys.stderr,
        )


def _old_roots(conn: sqlite3.Connection, db: Path, here: str) -> list[str]:
    """Artifact roots the store records other than here, except another path to this same
    database (a hard link or bind mount), whose recorded paths already reach these files."""
    roots = []
    for (root,) in conn.execute(_ROOTS_QUERY):
        if root == here:
            continue
        with contextlib.suppress(OSError):
            if os.path.samefile(_local_path(root).parent / "mlflow.db", db):
                continue
        roots.append(root)
    return roots


def _rewrite_roots(db: Path, here: str) -> list[str]:
    """Under the lock, in one write transaction: the roots still to move (another process may
    have moved them while this one waited), each rewritten in every artifact column."""
    conn = sqlite3.connect(str(db), timeout=60, isolation_level=None)
    roots: list[str] = []
    try:
        conn.execute("BEGIN IMMEDIATE")  # also keeps MLflow's own writers out meanwhile
        roots = _old_roots(conn, db, here)
        columns = _artifact_columns(conn)
        for old in roots:
            # Both spellings: MLflow writes file: URIs, a version's source may be a plain path.
            for before, after in ((old, here), (str(_local_path(old)), str(_local_path(here)))):
                for table, column, rows in columns:
                    conn.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                        f"WHERE ({column} = ? OR substr({column}, 1, ?) = ?) {rows}",
                        (after, len(before) + 1, before, len(before) + 1, before + "/"),
                    )
        conn.execute("COMMIT")
        return roots
    except sqlite3.Error as exc:
        with contextlib.suppress(sqlite3.Error):
            conn.rollback()
        raise PipelineError(
            f"{db} was moved from {_local_path(roots[0]).parent if roots else 'another folder'} "
            f"but its artifact paths could not be pointed at {_local_path(here)} ({exc}); "
            "make the database writable and re-run"
        ) from exc
    finally:
        conn.close()


def _artifact_columns(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
    """_ARTIFACT_COLUMNS that this database has (an older MLflow schema lacks some tables)."""
    present = []
    for table, column, rows in _ARTIFACT_COLUMNS:
        names = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column in names:
            present.append((table, column, rows))
    return present


def _forget_artifact_repos() -> None:
    """MLflow caches each run's and model's artifact folder per process, by id alone (3.17,
    _artifact_repos_cache): a process that used the old store would go on writing there."""
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    with contextlib.suppress(AttributeError):  # a private cache; gone in a later MLflow is fine
        utils._artifact_repos_cache.clear()  # type: ignore[union-attr]


def _local_path(file_uri: str) -> Path:
    return Path(url2pathname(urlsplit(file_uri).path))


def experiment_id(params: Params) -> str:
    c = client(params)
    exp = c.get_experiment_by_name(params.mlflow.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(
            params.mlflow.experiment, artifact_location=artifact_location(params)
        )
    except Exception:  # created concurrently by another process: use theirs
        exp = c.get_experiment_by_name(params.mlflow.experiment)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit(root: Path) -> str:
    """HEAD commit of the repo holding params.yaml, with '-dirty' if it has local changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def flat_params(params: Params) -> dict[str, str]:
    """Every parameter as `section.key` -> string, for mlflow params."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = _URI_USERINFO.sub("***@", str(node))

    walk("", params.model_dump(mode="json"))
    return {k: v for k, v in out.items() if not _SECRET_NAME.search(k)}


def start_or_resume_run(params: Params, run_name: str, run_dir: Path, tags: dict[str, str]) -> str:
    """The MLflow run for this training run: the one recorded in run_dir, or a new one.

    The run id is kept in a file beside the checkpoints rather than found by searching run
    names, so a resumed training continues exactly its own MLflow run.
    """
    id_file = run_dir / "mlflow_run_id"
    c = client(params)
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        try:
            c.get_run(run_id)
            c.update_run(run_id, status="RUNNING")
            return run_id
        except Exception:
            pass  # the tracking store was reset: start a new run below
    run = c.create_run(experiment_id(params), run_name=run_name, tags=tags)
    run_id = run.info.run_id
    items = sorted(flat_params(params).items())
    from mlflow.entities import Param

    try:
        c.log_batch(run_id, params=[Param(k, v) for k, v in items])  # the client chunks it
        atomic_write_text(id_file, run_id)
    except BaseException:
        # Not left RUNNING: a later run of the same name starts a new one (no id was kept).
        with contextlib.suppress(Exception):
            c.set_terminated(run_id, status="FAILED")
        raise
    return run_id


# -- lineage: the data a run used and the scores its models got, in MLflow's own records ------

# MLflow's input contexts for the three splits (its UI labels a run's datasets with them).
CONTEXTS = {"train": "training", "val": "validation", "test": "test"}
_DIGEST_LIMIT = 36  # the longest dataset digest MLflow stores


@dataclass(frozen=True)
class DataRef:
    """One split of the staged shards as MLflow knows it: metrics name their dataset by these."""

    name: str
    digest: str


def data_ref(manifest: dict, version: dict, split: str) -> DataRef:
    """`<source>-shards-<split>`, digested by DVC's .dir md5 of the shards folder, the hash
    `dvc pull` fetches them by; without one, the manifest's SHA-256 cut to MLflow's limit."""
    digest = version.get("dvc_md5") or str(version["manifest_sha256"])[:_DIGEST_LIMIT]
    return DataRef(f"{manifest['source']['name']}-shards-{split}", str(digest))


def shard_inputs(manifest: dict, version: dict, location: str, extra: dict[str, str]) -> list:
    """The three splits as MLflow dataset inputs, one per context, each sourced at the shards'
    folder or URL; extra (e.g. the DVC remote) goes into every profile. URLs are logged
    without a user:password@ part."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    remote = is_remote(location)
    # "local" and a URL's scheme are the source types of MLflow's own artifact sources, so
    # mlflow.data.get_source() resolves the logged source back to the shards.
    source_type = location.split("://", 1)[0] if remote else "local"
    source = json.dumps({"uri": masked(location)})
    inputs = []
    for split, context in CONTEXTS.items():
        ref = data_ref(manifest, version, split)
        profile = {
            "split": split,
            "samples": manifest["splits"].get(split, {}).get("samples"),
            "shards": len(manifest["splits"].get(split, {}).get("shards", [])),
            "sample_shape": manifest["sample"]["shape"],
            "manifest_sha256": version["manifest_sha256"],
            **{k: masked(v) for k, v in extra.items()},
        }
        dataset = Dataset(ref.name, ref.digest, source_type, source, profile=json.dumps(profile))
        inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return inputs


def log_data_inputs(client, run_id: str, inputs: list) -> None:
    """Best effort: the data version is also in the run's data.* tags, so a tracking store
    that refuses the inputs costs the UI's dataset view, never the training."""
    try:
        client.log_inputs(run_id, datasets=inputs)
    except Exception as exc:  # noqa: BLE001 - see above
        log.warning("MLflow did not record the run's dataset inputs (%s); going on", _why(exc))


def evaluation_metrics(metrics: dict) -> dict[str, float]:
    """An evaluation's numbers as MLflow metrics: test_<name>, and test_kl_dim_<i> per latent."""
    out = {
        f"test_{k}": float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    out.update({f"test_kl_dim_{i}": float(v) for i, v in enumerate(metrics.get("kl_per_dim", []))})
    return out


def log_model_metrics(
    client, run_id: str, model_ids: list[str], metrics: dict[str, float], data: DataRef
) -> None:
    """The test metrics on each logged model, linked to the test split, so the model's page
    and search_logged_models show them. Best effort, like the dataset inputs: the same numbers
    are in the run's metrics and the versions' test.* tags."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(k, v, now, 0, model_id=m, dataset_name=data.name, dataset_digest=data.digest)
        for m in model_ids
        for k, v in sorted(metrics.items())
    ]
    try:
        client.log_batch(run_id, metrics=batch)  # the client chunks it
    except Exception as exc:  # noqa: BLE001 - see above
        log.warning("MLflow did not link the test metrics to the logged models (%s)", _why(exc))


def _why(exc: BaseException) -> str:
    return (str(exc).splitlines()[0][:200] if str(exc) else "") or type(exc).__name__


def training_run(params: Params, client, info: dict):
    """The MLflow run train_result.json names, in the store params point at; one line when it
    is not there (train logged to another store, or that store was replaced)."""
    from mlflow.exceptions import MlflowException

    run_id = info.get("mlflow_run_id")
    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        raise PipelineError(
            f"training run {run_id} (train_result.json) is not in {masked(tracking_uri(params))}"
            f" (train logged to {masked(str(info.get('tracking_uri')))}); use the same "
            "mlflow.tracking_uri (or MLFLOW_TRACKING_URI) as train, or re-run train"
        ) from exc
