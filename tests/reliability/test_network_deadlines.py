"""Nothing waits without a deadline: a server that is down, silent (it takes the connection and
never answers) or not the server we expect costs one line, exit 2, within
VAE_PIPELINE_NETWORK_TIMEOUT_S, never a hang or a traceback. Real sockets on 127.0.0.1: a
listener that never answers, an HTTP server that is not Prefect, a closed port."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.params import REPO
from tests.servers import free_port

BIN = Path(sys.executable).parent
DEADLINE_S = 2


@pytest.fixture(scope="module")
def silent() -> Iterator[str]:
    """host:port of a listener whose backlog takes connections that never get a byte back."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def not_prefect() -> Iterator[str]:
    """An HTTP server that answers every request with 404, as any other web server might."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _run(tmp_path: Path, argv: list[str], **env: str) -> tuple[subprocess.CompletedProcess, float]:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    full = dict(os.environ) | {"VAE_PIPELINE_NETWORK_TIMEOUT_S": str(DEADLINE_S)} | env
    started = time.monotonic()
    proc = subprocess.run(
        [str(BIN / "vae-pipeline"), *argv, "--quiet"], cwd=tmp_path, env=full,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    return proc, time.monotonic() - started


def _one_line(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err and "unexpected" not in err, err
    return err


@pytest.mark.parametrize(
    "url,says",
    [
        ("closed", "does not answer within 2 s"),
        ("silent", "does not answer within 2 s"),
        ("not_prefect", "not as a Prefect server"),
        ("not-a-url", "is not an http(s) URL"),
    ],
)
def test_retrain_with_a_prefect_api_url_that_cannot_serve_is_one_line_in_seconds(
    tmp_path, silent, not_prefect, url, says
):
    where = {
        "closed": f"http://127.0.0.1:{free_port()}/api",
        "silent": f"http://{silent}/api",
        "not_prefect": f"http://{not_prefect}/api",
    }.get(url, url)
    proc, took = _run(tmp_path, ["retrain"], PREFECT_API_URL=where)
    assert says in _one_line(proc)
    assert took < 30, f"{took:.0f} s"
    assert not (tmp_path / "data").exists(), "the flow started work before the check"


def test_staging_to_an_object_store_that_never_answers_is_one_line_within_the_deadline(
    tmp_path, silent
):
    """Botocore's own defaults (60 s reads, retried by botocore and again by s3fs) waited
    for minutes; ours: two attempts of the deadline per call."""
    store = {
        "AWS_ENDPOINT_URL": f"http://{silent}", "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1",
    }  # fmt: skip
    proc, took = _run(tmp_path, ["stage", "--set", "data.shards_dir=s3://bucket/x"], **store)
    err = _one_line(proc)
    assert "did not answer" in err and "s3://bucket/x" in err, err
    assert took < 10 * DEADLINE_S + 10, f"{took:.0f} s"


def test_a_deadline_that_is_no_number_is_one_line(tmp_path):
    proc, _ = _run(tmp_path, ["stage"], VAE_PIPELINE_NETWORK_TIMEOUT_S="soon")
    assert "VAE_PIPELINE_NETWORK_TIMEOUT_S=soon" in _one_line(proc)


_CHECK = (
    "import sys; from pipelines.cluster import check_resources; "
    "from pipelines.params_file import load_params; "
    "check_resources(load_params(None, ['cluster.address=' + sys.argv[1]]).cluster)"
)


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_a_ray_address_that_takes_the_connection_and_says_nothing_is_one_line_in_seconds(
    silent, scheme
):
    """ray.init retried such an address for minutes, with Ray's warnings on stderr; the
    address now has to answer the gRPC (HTTP/2) handshake within the deadline. In a fresh
    process: one that already runs Ray would not connect again."""
    env = dict(os.environ) | {"VAE_PIPELINE_NETWORK_TIMEOUT_S": str(DEADLINE_S)}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK, f"{scheme}{silent}"], env=env, cwd=REPO,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "does not answer as a Ray cluster within 2 s" in proc.stderr, proc.stderr[-2000:]
    assert time.monotonic() - started < DEADLINE_S + 15


@pytest.fixture
def no_proxy(monkeypatch):
    """The remote check steps aside behind a proxy (it would not take the proxy's path)."""
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def _dvc_repo_pushing_to(folder: Path, endpoint: str) -> Path:
    """A real git + DVC repo whose default remote is an S3 bucket at endpoint, set as the
    README shows (`dvc remote add -d`, the endpoint in the --local config)."""
    env = dict(os.environ) | {"DVC_NO_ANALYTICS": "1", "GIT_CONFIG_NOSYSTEM": "1"}
    for cmd in (
        ["git", "init", "-q"],
        [str(BIN / "dvc"), "init", "-q"],
        [str(BIN / "dvc"), "remote", "add", "-d", "store", "s3://bucket/dvc"],
        [str(BIN / "dvc"), "remote", "modify", "--local", "store", "endpointurl", endpoint],
    ):
        subprocess.run(cmd, cwd=folder, env=env, check=True, capture_output=True, timeout=120)
    return folder


@pytest.mark.parametrize("server", ["closed", "silent"])
@pytest.mark.usefixtures("no_proxy")
def test_retrain_pushing_to_a_dvc_remote_that_cannot_answer_is_one_line_before_staging(
    tmp_path, silent, server
):
    """`dvc push` to an endpoint that takes the connection and never answers ran for more
    than ten minutes a try, and the push task tries four times."""
    where = f"http://127.0.0.1:{free_port()}" if server == "closed" else f"http://{silent}"
    _dvc_repo_pushing_to(tmp_path, where)
    creds = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    proc, took = _run(tmp_path, ["retrain"], **creds)
    err = _one_line(proc)
    assert "the default DVC remote 'store' (s3://bucket/dvc) does not answer at" in err, err
    assert where in err and "--no-push" in err, err
    assert took < 30, f"{took:.0f} s"
    assert not (tmp_path / "data").exists(), "staged before the check"


@pytest.mark.usefixtures("no_proxy")
def test_a_push_whose_remote_went_silent_fails_within_the_deadline_and_may_be_retried(
    tmp_path, silent, monkeypatch
):
    """The flow's push task, hours after the check at the start: the store may be gone."""
    from pipelines.data.versioning.dvc import DataVersion, DvcCommandError, push_version

    monkeypatch.setenv("VAE_PIPELINE_NETWORK_TIMEOUT_S", str(DEADLINE_S))
    repo = _dvc_repo_pushing_to(tmp_path, f"http://{silent}")
    version = DataVersion(versioned=True, repo=str(repo), dvc_file="data.dvc")
    started = time.monotonic()
    with pytest.raises(DvcCommandError, match=f"no answer within {DEADLINE_S} s") as failed:
        push_version(version)
    assert time.monotonic() - started < 10 * DEADLINE_S
    assert failed.value.retryable
