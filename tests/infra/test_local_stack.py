"""`infra/local/stack.py`: real MLflow, Prefect and Ray services on loopback, started and stopped.

The slow tests share one stack per module (starting it costs about 10 s on 2 cores) and stop it
in the last test; a finalizer stops it anyway if a test fails first.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from tests.helpers.modules import load_module
from tests.infra.conftest import STACK_PY, history, train_cli

REPO = Path(__file__).resolve().parents[2]
# Ray reserves 10002-19999 for its workers by default; the services' ports must lie outside.
RAY_WORKER_PORTS = range(10002, 20000)


stack = load_module("infra_local_stack", STACK_PY)


def run_stack(state: Path, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(STACK_PY), "--state-dir", str(state), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        port = stack.free_port("127.0.0.1")
        if port not in RAY_WORKER_PORTS:
            ports.add(port)
    return sorted(ports)


def _kill_recorded_sessions(state: Path) -> None:
    """Last resort if `down` itself failed: SIGKILL only the processes this test recorded."""
    for pid_file in state.glob("*.pid"):
        for proc in stack.process_tree(int(pid_file.read_text()), None):
            proc.kill()


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory):
    # A long pytest path on purpose: Ray's temp dir must then move to a short /tmp folder.
    state = tmp_path_factory.mktemp("local-stack-state") / "state"
    mlflow_port, prefect_port, ray_port = free_ports(3)
    up = run_stack(
        state,
        "up",
        "--mlflow-port",
        str(mlflow_port),
        "--prefect-port",
        str(prefect_port),
        "--ray-port",
        str(ray_port),
        "--timeout",
        "100",
    )
    record = json.loads((state / "stack.json").read_text()) if up.returncode == 0 else {}
    info = {
        "state": state,
        "up": up,
        "record": record,
        "ports": {"mlflow": mlflow_port, "prefect": prefect_port, "ray": ray_port},
        "pids": {name: int((state / f"{name}.pid").read_text()) for name in stack.DEFAULT_PORTS}
        if up.returncode == 0
        else {},
    }
    yield info
    if any(state.glob("*.pid")):
        down = run_stack(state, "down", timeout=60)
        if down.returncode != 0:
            _kill_recorded_sessions(state)


def _stack_env(info) -> dict[str, str]:
    env = dict(os.environ)
    env.update(info["record"]["env"])
    return env


@pytest.mark.slow
def test_up_starts_all_services_and_prints_urls_and_env_lines(local_stack):
    up = local_stack["up"]
    assert up.returncode == 0, up.stderr[-2000:]
    ports = local_stack["ports"]
    expected = {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
        "PREFECT_API_URL": f"http://127.0.0.1:{ports['prefect']}/api",
        "RAY_ADDRESS": f"127.0.0.1:{ports['ray']}",
    }
    env_sh = (local_stack["state"] / "env.sh").read_text()
    for key, val in expected.items():
        assert f"export {key}={val}" in up.stdout
        assert f"export {key}={val}" in env_sh
    assert local_stack["record"]["env"]["RAY_AUTH_MODE"] == "token"
    for name in stack.DEFAULT_PORTS:
        assert (local_stack["state"] / f"{name}.log").exists()


@pytest.mark.slow
def test_mlflow_server_keeps_experiments_runs_and_artifacts_in_the_state_dir(local_stack):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=local_stack["record"]["env"]["MLFLOW_TRACKING_URI"])
    name = f"stack-test-{uuid.uuid4().hex[:8]}"
    exp_id = client.create_experiment(name)
    assert client.get_experiment_by_name(name).experiment_id == exp_id

    run = client.create_run(exp_id)
    client.log_metric(run.info.run_id, "neg_elbo", 12.5)
    client.log_text(run.info.run_id, "hello", "notes/hello.txt")
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).data.metrics["neg_elbo"] == 12.5
    stored = list((local_stack["state"] / "mlartifacts").rglob("hello.txt"))
    assert [p.read_text() for p in stored] == ["hello"]


@pytest.mark.slow
def test_prefect_server_answers_health_and_stores_a_flow(local_stack):
    api = local_stack["record"]["env"]["PREFECT_API_URL"]
    with urllib.request.urlopen(f"{api}/health", timeout=10) as resp:
        assert json.load(resp) is True
    name = f"stack-test-{uuid.uuid4().hex[:8]}"
    req = urllib.request.Request(
        f"{api}/flows/",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        flow_id = json.load(resp)["id"]
    with urllib.request.urlopen(f"{api}/flows/{flow_id}", timeout=10) as resp:
        assert json.load(resp)["name"] == name
    assert (local_stack["state"] / "prefect" / "prefect.db").exists()


def _run_a_task_on_the_head(info) -> dict:
    code = (
        "import json, ray\n"
        "ray.init(log_to_driver=False)\n"  # address and token come from the stack's env
        "nodes = [n for n in ray.nodes() if n['Alive']]\n"
        "answer = ray.get(ray.remote(lambda: 6 * 7).remote())\n"
        "print(json.dumps({'nodes': len(nodes), 'answer': answer}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=_stack_env(info),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_ray_head_runs_tasks_for_a_driver_that_has_the_stack_token(local_stack):
    assert _run_a_task_on_the_head(local_stack) == {"nodes": 1, "answer": 42}


@pytest.mark.slow
def test_training_against_the_stack_matches_the_embedded_default(
    local_stack, infra_shards, embedded_reference, tmp_path
):
    stack_env = local_stack["record"]["env"]
    on_stack = train_cli(tmp_path / "stack", infra_shards, _stack_env(local_stack),
                         "mlflow.tracking_uri=null")  # fmt: skip
    embedded = embedded_reference

    assert embedded["tracking_uri"].startswith("sqlite:///")
    assert on_stack["tracking_uri"] == stack_env["MLFLOW_TRACKING_URI"]
    assert on_stack["run_name"] == embedded["run_name"]
    assert on_stack["epochs_run"] == embedded["epochs_run"] == 2
    for key in ("train_loss", "val_neg_elbo"):  # bit for bit: same seed, data and world size
        assert [h[key] for h in history(on_stack)] == [h[key] for h in history(embedded)]
    assert on_stack["best_val_neg_elbo"] == embedded["best_val_neg_elbo"]

    from mlflow import MlflowClient

    run = MlflowClient(stack_env["MLFLOW_TRACKING_URI"]).get_run(on_stack["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics, "the training logged no metrics to the stack's MLflow server"


def _listening(pids: list[int]) -> set[tuple[str, int]]:
    """The (address, port) of every TCP socket these processes listen on, IPv4 and IPv6."""
    found = set()
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            for conn in psutil.Process(pid).net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port))
    return found


def _tree_pids(pid: int) -> list[int]:
    return [proc.pid for proc in stack.process_tree(pid, None)]


# A dual-stack socket bound to 127.0.0.1 shows as the IPv4-mapped ::ffff:127.0.0.1.
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@pytest.mark.slow
def test_mlflow_and_prefect_listen_only_on_loopback(local_stack):
    """The real sockets, read from the kernel: every one the MLflow and Prefect servers (and
    their worker processes) listen on is bound to 127.0.0.1, none to 0.0.0.0 or ::."""
    assert local_stack["pids"], "stack did not start"
    for name in ("mlflow", "prefect"):
        sockets = _listening(_tree_pids(local_stack["pids"][name]))
        assert ("127.0.0.1", local_stack["ports"][name]) in sockets, (name, sockets)
        beyond = {(ip, port) for ip, port in sockets if ip != "127.0.0.1"}
        assert not beyond, f"{name} listens beyond loopback: {sorted(beyond)}"


@pytest.mark.slow
def test_every_server_the_stack_started_listens_only_on_loopback(local_stack):
    """After `up` and a task on the head (so Ray has started a worker): every TCP socket that
    any process of the stack listens on (MLflow, Prefect, and Ray's GCS, raylet, client server,
    agents, autoscaler and workers), read from the kernel, is bound to loopback."""
    assert local_stack["pids"], "stack did not start"
    assert _run_a_task_on_the_head(local_stack)["answer"] == 42
    by_service = {name: _listening(_tree_pids(pid)) for name, pid in local_stack["pids"].items()}
    ray = by_service["ray"]
    assert ("::ffff:127.0.0.1", local_stack["ports"]["ray"]) in ray or (
        "127.0.0.1", local_stack["ports"]["ray"]) in ray, ray  # fmt: skip
    assert len(ray) >= 4, f"expected the GCS, raylet, client server and agents: {ray}"
    beyond = {name: sorted(s for s in sockets if s[0] not in LOOPBACK)
              for name, sockets in by_service.items()}  # fmt: skip
    assert beyond == {"mlflow": [], "prefect": [], "ray": []}, beyond


@pytest.mark.slow
def test_status_reports_every_service_running(local_stack):
    out = run_stack(local_stack["state"], "status", timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in stack.DEFAULT_PORTS:
        assert any(line.split()[:2] == [name, "running"] for line in out.stdout.splitlines())


@pytest.mark.slow
def test_down_stops_every_started_process_and_frees_the_ports(local_stack):
    """Runs last in this module: it stops the shared stack."""
    state, pids = local_stack["state"], local_stack["pids"]
    assert pids, "stack did not start"
    ray_temp = Path(local_stack["record"]["ray_temp_dir"])
    assert ray_temp.exists()

    out = run_stack(state, "down", timeout=90)
    assert out.returncode == 0, out.stderr
    for name, pid in pids.items():
        assert stack.process_tree(pid, None) == [], f"{name} left processes behind"
    for name, port in local_stack["ports"].items():
        assert stack.port_free(port), f"{name} port {port} still taken"
    assert list(state.glob("*.pid")) == []
    assert not (state / "env.sh").exists()
    assert not ray_temp.exists(), "Ray's short temp dir outside the state dir was not removed"
    assert (state / "mlflow.db").exists(), "data must survive 'down'"

    after = run_stack(state, "status", timeout=60)
    assert after.returncode == 1
    assert all(line.split()[1] == "stopped" for line in after.stdout.splitlines())


def test_up_refuses_a_busy_port_and_starts_nothing(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        mlflow_port, prefect_port = free_ports(2)
        out = run_stack(
            tmp_path,
            "up",
            "--mlflow-port",
            str(mlflow_port),
            "--prefect-port",
            str(prefect_port),
            "--ray-port",
            str(busy),
            timeout=60,
        )
    assert out.returncode == 2
    assert f"port {busy} on 127.0.0.1 for ray is in use" in out.stderr
    assert list(tmp_path.glob("*.pid")) == []


@pytest.mark.slow
def test_up_that_fails_names_the_log_and_stops_what_it_started(tmp_path):
    mlflow_port, prefect_port = free_ports(2)
    # A free port inside Ray's worker port range: `ray start` refuses it and exits.
    ray_port = next(p for p in range(19990, 10002, -1) if stack.port_free(p))
    out = run_stack(
        tmp_path,
        "up",
        "--mlflow-port",
        str(mlflow_port),
        "--prefect-port",
        str(prefect_port),
        "--ray-port",
        str(ray_port),
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: ray exited with code 1 while starting; see {tmp_path / 'ray.log'}"
    )
    assert "worker_ports" in (tmp_path / "ray.log").read_text()
    assert list(tmp_path.glob("*.pid")) == []
    for port in (mlflow_port, prefect_port):
        assert stack.port_free(port)


def test_down_and_status_on_a_state_dir_with_nothing_running(tmp_path):
    down = run_stack(tmp_path, "down", timeout=60)
    assert down.returncode == 0
    assert "nothing to stop" in down.stderr
    status = run_stack(tmp_path, "status", timeout=60)
    assert status.returncode == 1
    assert [line.split() for line in status.stdout.splitlines()] == [
        ["mlflow", "stopped"],
        ["prefect", "stopped"],
        ["ray", "stopped"],
    ]


def _record_fake_service(state: Path, pid: int, create_time: float | None) -> None:
    state.mkdir(exist_ok=True)
    (state / "mlflow.pid").write_text(f"{pid}\n")
    record = {"services": {"mlflow": {"pid": pid, "create_time": create_time}}}
    (state / "stack.json").write_text(json.dumps(record))


def test_down_stops_a_recorded_session_including_children_that_left_its_group(tmp_path):
    # A leader plus a child in a process group of its own, like Ray's workers, and a grandchild
    # whose parent exits (re-parented away from the leader, still in its session).
    script = (
        "import os, subprocess, time\n"
        "subprocess.Popen(['sleep', '300'], preexec_fn=os.setpgrp)\n"
        "subprocess.Popen(['sh', '-c', 'sleep 300 & exit 0']).wait()\n"
        "time.sleep(300)\n"
    )
    leader = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(stack.process_tree(leader.pid, None)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        members = stack.process_tree(leader.pid, None)
        assert len(members) == 3
        _record_fake_service(tmp_path, leader.pid, psutil.Process(leader.pid).create_time())
        out = run_stack(tmp_path, "down", "--grace", "5", timeout=60)
        assert out.returncode == 0, out.stderr
        leader.wait(timeout=10)
        assert stack.process_tree(leader.pid, None) == []
        assert not (tmp_path / "mlflow.pid").exists()
    finally:
        _kill_recorded_sessions(tmp_path)
        if leader.poll() is None:
            leader.kill()


def test_down_leaves_a_process_alone_when_its_pid_was_reused(tmp_path):
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        _record_fake_service(tmp_path, other.pid, psutil.Process(other.pid).create_time() - 1)
        out = run_stack(tmp_path, "down", "--grace", "1", timeout=60)
        assert out.returncode == 0, out.stderr
        assert other.poll() is None, "down killed a process it did not start"
        assert not (tmp_path / "mlflow.pid").exists(), "the stale pid file must go"
    finally:
        other.kill()
        other.wait()


def test_up_refuses_a_state_dir_whose_stack_is_still_running(tmp_path):
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        _record_fake_service(tmp_path, other.pid, psutil.Process(other.pid).create_time())
        ports = [str(p) for p in free_ports(3)]
        out = run_stack(tmp_path, "up", "--mlflow-port", ports[0], "--prefect-port", ports[1],
                        "--ray-port", ports[2], timeout=60)  # fmt: skip
        assert out.returncode == 2
        assert out.stderr.strip() == (
            f"error: stack in {tmp_path} is already running: mlflow (pid {other.pid}); "
            "run 'down' first"
        )
        assert other.poll() is None and (tmp_path / "mlflow.pid").exists()
    finally:
        other.kill()
        other.wait()
