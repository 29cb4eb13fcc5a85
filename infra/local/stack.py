"""A real local stack for the pipeline: MLflow server, Prefect server and a Ray head on 127.0.0.1.

    python infra/local/stack.py up      # start all three, wait until each answers, print URLs
    python infra/local/stack.py status  # is each one running and answering?
    python infra/local/stack.py down    # stop exactly the processes `up` started
    source .stack/env.sh                # point the pipeline at the stack

Everything lives in one state folder (default `.stack/` in the repo root, `--state-dir` to move
it): pid files, one log per service, `stack.json`, `env.sh`, the MLflow SQLite database and
artifacts, Prefect's home and database, and the Ray head's temp folder and auth token. Data
survives `down`; delete the folder to start from scratch.

How services are stopped. Each service starts in a new session, so its recorded pid is also the
id of a session that holds it and everything it spawns (Ray's workers leave the process group but
not the session). `down` signals only the processes of those recorded sessions, never by name:
no `pkill`, no `ray stop` (which stops every Ray on the machine, including other users'). Ray's
head runs as `ray start --head --block`, which stays in the foreground and supervises the GCS,
raylet and workers; on SIGTERM it drains the node and stops its children itself, so `down` sends
SIGTERM to that one process first and signals the rest of its session only if something is still
alive after the grace period (then SIGKILL).

`ray_node_service` also builds a second node that joins the head on the same machine, and
`launch`, `wait_until_answering` and `stop_sessions` run it (see tests/infra/test_multinode.py).

Only the standard library is used here; the services come from the same virtualenv.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STATE_DIR = REPO_ROOT / ".stack"
DEFAULT_PORTS = {"mlflow": 5000, "prefect": 4200, "ray": 6379}
STATE_FILE = "stack.json"
ENV_FILE = "env.sh"
# AF_UNIX socket paths are limited to 107 bytes; Ray puts its sockets at
# <temp-dir>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store (about 64 bytes more).
RAY_TEMP_DIR_MAX_LEN = 40
# Ray drains the node on SIGTERM for up to this long (default 30 s); the local head runs no
# Serve replicas, so a short drain is enough.
RAY_DRAIN_TIMEOUT_S = "5"


class StackError(Exception):
    """A problem the user can fix; printed as one line."""


# -- processes ------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, session id) of a process from /proc, None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # state ppid pgrp session ...
    return fields[0], int(fields[3])


def start_time(pid: int) -> int | None:
    """Kernel start time of `pid` (clock ticks after boot); None if it is gone or unknown."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return int(raw[raw.rindex(")") + 2 :].split()[19])


def _have_procfs() -> bool:
    return Path("/proc/self/stat").exists()


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes in session `sid`.

    A session, not a process group: Ray's workers move to process groups of their own
    (setpgid) but stay in the session of the `ray start` that supervises them.
    """
    if not _have_procfs():  # macOS: the kernel can only tell us about the group
        try:
            os.killpg(sid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [sid]
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat and stat[1] == sid and stat[0] != "Z":
                members.append(int(entry))
    return members


def _signal_session(sid: int, sig: signal.Signals) -> None:
    targets = session_members(sid) if _have_procfs() else []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, sig)
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _signal_pid(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _wait_sessions_gone(sids: list[int], timeout: float) -> list[int]:
    """Wait until none of the sessions has a live process; return those still alive."""
    deadline = time.monotonic() + timeout
    alive = [s for s in sids if session_members(s)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [s for s in alive if session_members(s)]
    return alive


# -- health checks --------------------------------------------------------------------------


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback URL)
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_free(host: str, port: int) -> bool:
    """Nothing listens on it. SO_REUSEADDR, as servers set it: closed connections that linger
    in TIME_WAIT do not keep a port from being served again."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return not port_open(_connect_host(host), port, timeout=0.2)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _connect_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def _ray_answers(executable: str, address: str, env: dict[str, str]) -> bool:
    """`ray status` against the head: the GCS is up, accepts our token and knows a node."""
    host, port = address.rsplit(":", 1)
    if not port_open(host, int(port)):
        return False
    try:
        out = subprocess.run(
            [executable, "status", "--address", address],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0


def _ray_node_answers(
    executable: str, head: str, env: dict[str, str], host: str, port: int
) -> bool:
    """A node that joined `head`: its raylet listens on `port` and the head answers."""
    return port_open(host, port) and _ray_answers(executable, head, env)


# -- services -------------------------------------------------------------------------------


@dataclass
class Service:
    name: str
    port: int
    url: str
    argv: list[str]
    env: dict[str, str]
    answers: Callable[[], bool]
    # Ray's supervisor must get SIGTERM alone (it drains, then stops its children); signalling
    # the whole session at once kills the GCS under it and turns a 1 s stop into a 30 s one.
    signal_leader_first: bool = False
    extra: dict[str, object] = field(default_factory=dict)
    proc: subprocess.Popen | None = None  # set by `launch`


def _executable(name: str) -> str:
    """The console script from this interpreter's environment, else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise StackError(
            f"'{name}' is not installed next to {sys.executable} nor on PATH; "
            "run 'make setup' and use .venv/bin/python"
        )
    return found


def _ray_temp_dir(state: Path, name: str = "ray") -> tuple[Path, bool]:
    """A node's temp dir: <state>/<name> when short enough for Unix sockets, else in /tmp."""
    inside = state / name
    if len(str(inside)) <= RAY_TEMP_DIR_MAX_LEN:
        inside.mkdir(parents=True, exist_ok=True)
        return inside, False
    return Path(tempfile.mkdtemp(prefix="vae-stack-ray-", dir="/tmp")), True


def _ray_token(state: Path) -> Path:
    """A private Ray auth token for this stack (Ray 2.60 enables token auth by default)."""
    path = state / "ray_auth_token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path


def ray_client_env(token_path: Path) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


def _mlflow_service(state: Path, host: str, port: int) -> Service:
    url = f"http://{_connect_host(host)}:{port}"
    argv = [
        _executable("mlflow"),
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{state / 'mlflow.db'}",
        "--artifacts-destination",
        str(state / "mlartifacts"),
        "--workers",
        "1",
    ]
    # The GenAI job runner (7 huey consumer processes) is not used by the pipeline.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return Service("mlflow", port, url, argv, env, answers=lambda: http_ok(f"{url}/health"))


def _prefect_service(state: Path, host: str, port: int) -> Service:
    url = f"http://{_connect_host(host)}:{port}"
    argv = [_executable("prefect"), "server", "start", "--host", host, "--port", str(port)]
    env = {
        **os.environ,
        "PREFECT_HOME": str(state / "prefect"),  # not ~/.prefect
        "PREFECT_API_URL": f"{url}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    return Service("prefect", port, url, argv, env, answers=lambda: http_ok(f"{url}/api/health"))


def ray_node_service(
    state: Path,
    host: str,
    *,
    port: int | None = None,
    join: str | None = None,
    num_cpus: int | None = None,
    name: str = "ray",
) -> Service:
    """`ray start --block` for a head listening on `port`, or for a node joining the head at
    `join` (host:port). Each node gets the stack's token, a temp dir `<state>/<name>` (or a
    short /tmp one) and free side ports, so several nodes can share one machine."""
    if (port is None) == (join is None):
        raise ValueError("give either port (a head) or join (a node joining that head)")
    client = _connect_host(host)
    exe = _executable("ray")
    temp_dir, temp_outside = _ray_temp_dir(state, name)
    env = {
        **os.environ,
        **ray_client_env(_ray_token(state)),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": RAY_DRAIN_TIMEOUT_S,
    }
    env.pop("RAY_ADDRESS", None)
    # Ray's side ports default to fixed numbers (8265, 52365, ...) that a second Ray on the
    # machine would already hold, so each gets a free port; they are recorded in stack.json.
    side_ports = {
        "--dashboard-agent-listen-port": free_port(client),
        "--dashboard-agent-grpc-port": free_port(client),
        "--runtime-env-agent-port": free_port(client),
        "--metrics-export-port": free_port(client),
    }
    if join is None:
        address = f"{client}:{port}"
        role = ["--head", "--port", str(port), "--dashboard-host", client]
        side_ports["--dashboard-port"] = free_port(client)
        answers = functools.partial(_ray_answers, exe, address, env)
    else:
        address = join
        role = ["--address", join]
        port = side_ports["--node-manager-port"] = free_port(client)
        answers = functools.partial(_ray_node_answers, exe, join, env, client, port)
    argv = [
        exe,
        "start",
        *role,
        "--block",  # stay in the foreground as the supervisor whose pid `down` signals
        "--node-ip-address",
        client,
        *(["--num-cpus", str(num_cpus)] if num_cpus is not None else []),
        *[str(x) for pair in side_ports.items() for x in pair],
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
    ]
    return Service(
        name,
        port,
        address,
        argv,
        env,
        answers=answers,
        signal_leader_first=True,
        extra={
            "temp_dir": str(temp_dir),
            "temp_dir_outside_state": temp_outside,
            "side_ports": {k.lstrip("-"): v for k, v in side_ports.items()},
        },
    )


def build_services(state: Path, host: str, ports: dict[str, int]) -> list[Service]:
    """The three services, with absolute paths under `state` (Ray workers change directory)."""
    return [
        _mlflow_service(state, host, ports["mlflow"]),
        _prefect_service(state, host, ports["prefect"]),
        ray_node_service(state, host, port=ports["ray"]),
    ]


def client_env(state: Path, host: str, ports: dict[str, int]) -> dict[str, str]:
    """What a pipeline process needs to use the stack instead of the embedded defaults."""
    client = _connect_host(host)
    return {
        "MLFLOW_TRACKING_URI": f"http://{client}:{ports['mlflow']}",
        "PREFECT_API_URL": f"http://{client}:{ports['prefect']}/api",
        "RAY_ADDRESS": f"{client}:{ports['ray']}",
        **ray_client_env(state / "ray_auth_token"),
    }


# -- state folder ---------------------------------------------------------------------------


def _pid_file(state: Path, name: str) -> Path:
    return state / f"{name}.pid"


def _log_file(state: Path, name: str) -> Path:
    return state / f"{name}.log"


def load_state(state: Path) -> dict:
    path = state / STATE_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StackError(f"{path} is not valid JSON ({exc}); delete it and run 'up' again") from exc


def recorded_pids(state: Path) -> dict[str, int]:
    """Service name -> recorded pid (= its session id), from the pid files.

    A pid whose number now belongs to a different process (the recorded start time differs) is
    left out: the kernel reuses a pid only once its session is empty, so nothing of ours is left
    there, and signalling it would hit someone else's process.
    """
    started = {
        name: info.get("start_time") for name, info in load_state(state).get("services", {}).items()
    }
    pids = {}
    for name in DEFAULT_PORTS:
        path = _pid_file(state, name)
        if not path.exists():
            continue
        try:
            pid = int(path.read_text().strip())
        except ValueError as exc:
            raise StackError(f"{path} does not hold a pid; remove it by hand") from exc
        now = start_time(pid)
        if now is not None and started.get(name) is not None and now != started[name]:
            path.unlink()  # stale: the pid was reused
            continue
        pids[name] = pid
    return pids


def _write_env_file(state: Path, env: dict[str, str]) -> Path:
    path = state / ENV_FILE
    lines = ["# Written by infra/local/stack.py up; `source` it to use the local stack."]
    lines += [f"export {k}={v}" for k, v in env.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- commands -------------------------------------------------------------------------------


def _check_host(host: str) -> None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError as exc:
        raise StackError(f"--host {host!r} is not an IP address; use e.g. 127.0.0.1") from exc
    if address.version != 4:
        raise StackError(f"--host {host}: only IPv4 addresses are supported; use 127.0.0.1")
    loopback = address.is_loopback
    if not loopback:
        print(
            f"warning: binding {host}: MLflow and Prefect have no authentication and will be "
            "reachable from other machines; keep 127.0.0.1 unless the network is trusted",
            file=sys.stderr,
        )


def up(state: Path, host: str, ports: dict[str, int], timeout: float) -> dict[str, str]:
    """Start the three services, wait until each answers, write env.sh; stop all on failure."""
    _check_host(host)
    state.mkdir(parents=True, exist_ok=True)
    running = {n: p for n, p in recorded_pids(state).items() if session_members(p)}
    if running:
        listed = ", ".join(f"{n} (pid {p})" for n, p in running.items())
        raise StackError(f"stack in {state} is already running: {listed}; run 'down' first")
    for name, port in ports.items():
        if not port_free(host, port):
            raise StackError(
                f"port {port} on {host} for {name} is in use; stop what holds it "
                f"or pass --{name}-port with a free port"
            )

    services = build_services(state, host, ports)
    record: dict = {"host": host, "ports": ports, "services": {}}
    try:
        for svc in services:
            proc = launch(svc, state)
            log = _log_file(state, svc.name)
            _pid_file(state, svc.name).write_text(f"{proc.pid}\n")
            record["services"][svc.name] = {
                "pid": proc.pid,
                "start_time": start_time(proc.pid),
                "port": svc.port,
                "url": svc.url,
                "log": str(log),
                "signal_leader_first": svc.signal_leader_first,
                **svc.extra,
            }
            (state / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        wait_until_answering(services, state, timeout)
    except BaseException:
        down(state, quiet=True)
        ray = next(svc for svc in services if svc.name == "ray")
        if ray.extra["temp_dir_outside_state"]:
            shutil.rmtree(str(ray.extra["temp_dir"]), ignore_errors=True)
        raise
    env = client_env(state, host, ports)
    record["env"] = env
    (state / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    _write_env_file(state, env)
    return env


def launch(svc: Service, state: Path) -> subprocess.Popen:
    """Start `svc` in a session of its own (sid == pgid == pid), logging to <state>/<name>.log."""
    with open(_log_file(state, svc.name), "ab") as out:
        proc = subprocess.Popen(
            svc.argv,
            env=svc.env,
            cwd=state,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    svc.proc = proc
    return proc


def wait_until_answering(services: list[Service], state: Path, timeout: float) -> None:
    """Wait until every launched service answers; raise if one exits or the time runs out."""
    deadline = time.monotonic() + timeout
    pending = list(services)
    while pending:
        for svc in list(pending):
            proc = svc.proc
            if proc is None:
                raise StackError(f"{svc.name} was never launched")
            if proc.poll() is not None:
                raise StackError(
                    f"{svc.name} exited with code {proc.returncode} while starting; "
                    f"see {_log_file(state, svc.name)}"
                )
            if svc.answers():
                print(f"{svc.name:<8} up      {svc.url}", file=sys.stderr)
                pending.remove(svc)
        if pending and time.monotonic() > deadline:
            svc = pending[0]
            raise StackError(
                f"{svc.name} did not answer on {svc.url} within {timeout:.0f} s; "
                f"see {_log_file(state, svc.name)} (or raise --timeout)"
            )
        if pending:
            time.sleep(0.5)


def down(state: Path, grace: float = 20.0, quiet: bool = False) -> list[str]:
    """Stop the recorded sessions: SIGTERM, then SIGKILL after `grace` seconds."""
    record = load_state(state).get("services", {})
    pids = recorded_pids(state)
    stop_sessions(
        {pid: bool(record.get(name, {}).get("signal_leader_first")) for name, pid in pids.items()},
        grace,
    )
    stopped = []
    for name, pid in pids.items():
        _pid_file(state, name).unlink(missing_ok=True)
        stopped.append(name)
        if not quiet:
            print(f"{name:<8} stopped (pid {pid})", file=sys.stderr)
    ray = record.get("ray", {})
    if ray.get("temp_dir_outside_state"):
        shutil.rmtree(ray["temp_dir"], ignore_errors=True)
    (state / ENV_FILE).unlink(missing_ok=True)
    (state / STATE_FILE).unlink(missing_ok=True)
    return stopped


def stop_sessions(sessions: dict[int, bool], grace: float = 20.0) -> None:
    """Stop sessions started by `launch`, keyed by leader pid: SIGTERM to the leader alone where
    the value is true (a Ray supervisor), else to the whole session; SIGKILL after `grace`."""
    for sid, leader_first in sessions.items():
        if leader_first:
            _signal_pid(sid, signal.SIGTERM)
        else:
            _signal_session(sid, signal.SIGTERM)
    alive = _wait_sessions_gone(list(sessions), grace)
    for sid in alive:  # a supervisor that did not finish: signal everything it left behind
        _signal_session(sid, signal.SIGTERM)
    alive = _wait_sessions_gone(alive, 5.0)
    for sid in alive:
        _signal_session(sid, signal.SIGKILL)
    alive = _wait_sessions_gone(alive, 5.0)
    if alive:
        raise StackError(f"sessions {alive} survived SIGKILL; look at them with 'ps -s {alive[0]}'")


def status(state: Path) -> dict[str, str]:
    """Service name -> 'running', 'not answering' or 'stopped'."""
    record = load_state(state)
    pids = recorded_pids(state)
    result = {}
    for name in DEFAULT_PORTS:
        info = record.get("services", {}).get(name, {})
        pid = pids.get(name)
        if pid is None or not session_members(pid):
            result[name] = "stopped"
            continue
        if name == "ray":
            env = {**os.environ, **ray_client_env(state / "ray_auth_token")}
            ok = _ray_answers(_executable("ray"), info.get("url", ""), env)
        elif name == "prefect":
            ok = http_ok(f"{info.get('url')}/api/health")
        else:
            ok = http_ok(f"{info.get('url')}/health")
        result[name] = "running" if ok else "not answering"
    return result


# -- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python infra/local/stack.py",
        description="Start, inspect or stop a local MLflow server, Prefect server and Ray head.",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="pid files, logs, databases and env.sh (default: %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_up = sub.add_parser("up", help="start the services and wait until each answers")
    p_up.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    for name, port in DEFAULT_PORTS.items():
        p_up.add_argument(
            f"--{name}-port", type=int, default=port, help=f"{name} port (default: %(default)s)"
        )
    p_up.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for each service to answer"
    )
    p_down = sub.add_parser("down", help="stop the processes that 'up' started")
    p_down.add_argument(
        "--grace", type=float, default=20.0, help="seconds between SIGTERM and SIGKILL"
    )
    sub.add_parser("status", help="report each service: running, not answering or stopped")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    state = args.state_dir.expanduser().resolve()
    try:
        if args.command == "up":
            ports = {name: getattr(args, f"{name}_port") for name in DEFAULT_PORTS}
            env = up(state, args.host, ports, args.timeout)
            print(f"stack is up; state, logs and env.sh in {state}")
            print(f"  MLflow UI   {env['MLFLOW_TRACKING_URI']}")
            print(f"  Prefect UI  {env['PREFECT_API_URL'].removesuffix('/api')}")
            print(f"  Ray head    {env['RAY_ADDRESS']}")
            print(f"use it from a shell with: source {state / ENV_FILE}")
            for key, val in env.items():
                print(f"export {key}={val}")
        elif args.command == "down":
            if not down(state, grace=args.grace):
                print(f"nothing to stop in {state}", file=sys.stderr)
        else:
            report = status(state)
            info = load_state(state).get("services", {})
            for name, what in report.items():
                where = info.get(name, {}).get("url", "") if what != "stopped" else ""
                print(f"{name:<8} {what:<14} {where}".rstrip())
            return 0 if all(v == "running" for v in report.values()) else 1
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; stopped what had started", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
