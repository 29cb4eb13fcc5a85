"""Real servers for tests, bound to 127.0.0.1 on free ports, always stopped afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: free_port's probe socket is closed again."""
    return free_port()


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early; log:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout}s; log:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def mlflow_server(workdir: Path, timeout: float = 180) -> Iterator[str]:
    """`mlflow server` with a SQLite backend and local artifacts; yields its http URI."""
    proc, uri = start_mlflow_server(workdir, free_port(), timeout)
    try:
        yield uri
    finally:
        stop_process_group(proc)


def start_mlflow_server(workdir: Path, port: int, timeout: float = 180):
    """Start `mlflow server` on 127.0.0.1:port over workdir's store and wait until it answers;
    (process, URI). Starting it again on the same workdir and port brings the same server back."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "mlflow-server.log"
    cmd = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination", str(workdir / "artifacts"),
        "--workers", "1",
    ]  # fmt: skip
    # MLflow 3's job execution (its GenAI scorers, prompt optimisation, trace roll-ups; nothing
    # the pipeline uses) starts seven huey consumer processes beside the server: about 35 s of
    # CPU per start on 2 busy cores. Off, as in infra/local/stack.py and the multi-host cluster.
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "a") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", timeout, proc, log)
    except BaseException:
        stop_process_group(proc)
        raise
    return proc, uri


def stop_process_group(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the server's own process group (it was started in a new session), then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@contextlib.contextmanager
def s3_server(workdir: Path, timeout: float = 60, auth_after: int | None = None) -> Iterator[str]:
    """An S3-compatible object store (moto's standalone server) on 127.0.0.1; yields its
    endpoint URL. State lives in memory: stopping it loses every bucket. auth_after=N: after N
    requests, every request must be signed with an access key the server's IAM knows."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "s3-server.log"
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    env = dict(os.environ)
    if auth_after is not None:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(auth_after)
    with open(log, "a") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{endpoint}/moto-api/", timeout, proc, log)
        yield endpoint
    finally:
        stop_process_group(proc)
