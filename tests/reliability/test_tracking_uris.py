"""Tracking URIs MLflow cannot use: every command that talks to MLflow refuses them in one line
that names the URI (credentials masked), what is wrong and what to do, before any work.

The web servers are real: `python -m http.server` and a stdlib server that answers 200 on
/health and 404 everywhere else, both on 127.0.0.1. Read-only is a real read-only mount in a
private mount namespace, since root ignores permission bits.
"""

from __future__ import annotations

import http.server
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from pipelines import tracking, tracking_checks
from pipelines.cli import main
from tests.helpers.mounts import cli_on_read_only
from tests.reliability.conftest import Workspace
from tests.servers import free_port, stop_process_group

Uri = Callable[[Path, "Servers"], str]


@dataclass(frozen=True)
class Servers:
    static: str  # python -m http.server
    health_only: str  # 200 on /health, 404 elsewhere


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("http-root")
    (root / "index.html").write_text("<h1>not MLflow</h1>")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    health = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HealthOnly)
    thread = threading.Thread(target=health.serve_forever, daemon=True)
    thread.start()
    try:
        static = f"http://127.0.0.1:{port}"
        _wait_until_answering(static)
        yield Servers(static, f"http://127.0.0.1:{health.server_port}")
    finally:
        health.shutdown()
        health.server_close()
        stop_process_group(proc)


class _HealthOnly(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        ok = self.path == "/health"
        body = b"OK" if ok else b"not found"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _wait_until_answering(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _a_file(tmp: Path, name: str = "notes.txt") -> Path:
    (tmp / name).write_text("not a database\n")
    return tmp / name


@dataclass(frozen=True)
class Case:
    id: str
    uri: Uri
    names: str  # the error line must contain this


CASES = [
    Case("unknown-scheme", lambda tmp, s: "ftp://127.0.0.1/mlflow", "scheme 'ftp'"),
    Case("host-without-scheme", lambda tmp, s: "localhost:5000", "scheme 'localhost'"),
    Case("unity-catalog", lambda tmp, s: "databricks-uc", "Unity Catalog"),
    Case("plain-folder", lambda tmp, s: str(tmp / "mlruns"), "MLFLOW_ALLOW_FILE_STORE=true"),
    # A database file given as a path: the advice names the sqlite URI, not a folder store.
    Case("plain-db-file", lambda tmp, s: str(tmp / "mlflow.db"), "sqlite:///"),
    Case("file-uri", lambda tmp, s: (tmp / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE=true"),
    Case("sqlite-in-memory", lambda tmp, s: "sqlite://", "in-memory"),
    Case("sqlite-one-slash", lambda tmp, s: f"sqlite:{tmp}/m.db", "not an SQLite URL"),
    Case("sqlite-folder-missing", lambda tmp, s: f"sqlite:///{tmp}/no/m.db", "does not exist"),
    Case("sqlite-path-is-folder", lambda tmp, s: f"sqlite:///{tmp}", "is a folder"),
    Case(
        "sqlite-folder-is-a-file",
        lambda tmp, s: f"sqlite:///{_a_file(tmp)}/m.db",
        "notes.txt is a file",
    ),
    Case(
        "sqlite-file-not-a-database",
        lambda tmp, s: f"sqlite:///{_a_file(tmp)}",
        "is not an SQLite database",
    ),
    Case("http-without-host", lambda tmp, s: "http://", "names no host"),
    Case("http-bad-ipv6", lambda tmp, s: "http://[::1", "not a valid URL"),
    Case("http-port-out-of-range", lambda tmp, s: "http://127.0.0.1:99999", "not a valid URL"),
    Case(
        "database-driver-unknown",
        lambda tmp, s: "postgresql+nosuchdriver://alice:hunter2@127.0.0.1/mlflow",
        "nosuchdriver",
    ),
    Case(
        "database-server-down-with-credentials",
        lambda tmp, s: f"postgresql+psycopg2://alice:hunter2@127.0.0.1:{free_port()}/mlflow",
        "cannot be reached (connection to server at",
    ),
    Case("plain-web-server", lambda tmp, s: s.static, "not as an MLflow tracking server"),
    Case(
        "server-with-health-but-no-mlflow-api",
        lambda tmp, s: s.health_only,
        "not as an MLflow tracking server",
    ),
    Case(
        "server-down-with-credentials",
        lambda tmp, s: f"https://alice:hunter2@127.0.0.1:{free_port()}",
        "unreachable",
    ),
]


# The same classes through the other commands that talk to MLflow (each reaches MLflow by
# another path: the training run, the registry, a registered model).
def _evaluate(ws: Workspace, tmp: Path) -> list[str]:
    """evaluate on a copy of the trained model, so that its outputs stay out of the workspace."""
    shutil.copytree(ws.root / "outputs" / "train", tmp / "out" / "train")
    return ["evaluate", "--set", f"outputs_dir={tmp}/out"]


OTHER_COMMANDS: dict[str, Callable[[Workspace, Path], list[str]]] = {
    "evaluate": _evaluate,
    "register": lambda ws, tmp: ["register"],
    "embed": lambda ws, tmp: ["embed", "--out", f"{tmp}/e.parquet"],
    "generate": lambda ws, tmp: ["generate", "--out", f"{tmp}/g.png"],
}
FOR_EVERY_COMMAND = (
    "unknown-scheme",
    "plain-folder",
    "sqlite-path-is-folder",
    "plain-web-server",
    "server-with-health-but-no-mlflow-api",
    "database-driver-unknown",
)


def _run(ws: Workspace, argv: list[str], uri: str, capsys) -> str:
    files, registry = ws.files(), ws.registry()
    capsys.readouterr()
    code = main(
        [*argv, "--set", f"mlflow.tracking_uri={uri}", "--params", str(ws.params_file), "--quiet"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert ws.files() == files, "a workspace file changed"
    assert ws.registry() == registry, "the registry changed"
    return err


def _masked(uri: str) -> str:
    return tracking.masked(uri)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_train_refuses_a_tracking_uri_mlflow_cannot_use_in_one_line(
    case, workspace, servers, tmp_path, capsys
):
    uri = case.uri(tmp_path, servers)
    err = _run(workspace, ["train"], uri, capsys)
    assert f"mlflow.tracking_uri {_masked(uri)}: " in err, err
    assert case.names in err, err
    assert "hunter2" not in err
    assert not (workspace.root / "runs").exists() or sorted(
        p.name for p in (workspace.root / "runs").iterdir()
    ) == ["workspace"], "no run folder was created"


@pytest.mark.parametrize("command", sorted(OTHER_COMMANDS))
@pytest.mark.parametrize("case_id", FOR_EVERY_COMMAND)
def test_every_mlflow_command_refuses_the_same_uris_in_one_line(
    command, case_id, workspace, servers, tmp_path, capsys
):
    case = next(c for c in CASES if c.id == case_id)
    uri = case.uri(tmp_path, servers)
    err = _run(workspace, OTHER_COMMANDS[command](workspace, tmp_path), uri, capsys)
    assert case.names in err, err
    assert "hunter2" not in err


def test_a_relative_sqlite_path_in_params_is_read_from_the_params_folder(workspace):
    params = workspace.params("mlflow.tracking_uri=sqlite:///mlflow.db")
    assert tracking.store_of(params).uri == f"sqlite:///{workspace.root / 'mlflow.db'}"


def test_a_folder_store_is_accepted_when_mlflow_is_told_to_allow_it(workspace, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tracking_checks.check_reachable(
        tracking.store_of(workspace.params(f"mlflow.tracking_uri={workspace.root}/mlruns"))
    )


def test_an_sqlite_database_in_a_read_only_folder_is_refused_in_one_line(workspace, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copy(workspace.root / "mlflow.db", ro / "mlflow.db")
    argv = ["train", "--set", f"mlflow.tracking_uri=sqlite:///{ro / 'mlflow.db'}"]
    files = workspace.files()
    result = cli_on_read_only(ro, workspace.params_file, {"train": argv})["train"]
    assert result["code"] == 2, result["err"]
    assert result["err"].startswith("error: ") and "\n" not in result["err"], result["err"]
    assert f"mlflow.tracking_uri sqlite:///{ro / 'mlflow.db'}" in result["err"]
    assert "read-only file system" in result["err"].lower(), result["err"]
    assert workspace.files() == files
