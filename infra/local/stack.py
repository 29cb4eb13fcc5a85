"""A local stack for the pipeline: an MLflow server, a Prefect server and a Ray head on 127.0.0.1.

    python infra/local/stack.py up      # start all three, wait until each answers, print URLs
    python infra/local/stack.py status  # is each one running and answering?
    python infra/local/stack.py down    # stop exactly the processes `up` started
    source .stack/env.sh                # point the pipeline at the stack

One state folder (`.stack/`, `--state-dir` moves it) holds a pid file and a log per service,
`stack.json`, `env.sh`, MLflow's database and artifacts, Prefect's home, and Ray's temp dir and
auth token. Data survives `down`; delete the folder to start from scratch.

Each service is a plain `mlflow server`, `prefect server start` or `ray start --head --block`
in a session of its own. `down` stops what `up` recorded and nothing else (psutil): the recorded
pid if its start time still matches, its descendants and the rest of its session. SIGTERM
first (to `ray start` alone: it drains the node and stops its own children), SIGKILL after the
grace period. Never `ray stop`, which would stop every Ray on the machine.

Loopback: `ray start` on Linux turns `--node-ip-address 127.0.0.1` into the machine's primary
address, and its servers then listen on every interface. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
(Ray's single-machine mode, the default on macOS and Windows) keeps the node at 127.0.0.1 and
every Ray server on 127.0.0.1; drivers need it too, so env.sh exports it. Such a head accepts no
other nodes (see infra/testing/ray_nodes.py for a multi-node Ray on one machine).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STATE_DIR = REPO_ROOT / ".stack"
DEFAULT_PORTS = {"mlflow": 5000, "prefect": 4200, "ray": 6379}
STATE_FILE, ENV_FILE = "stack.json", "env.sh"
# Ray's Unix sockets (at most 107 bytes) lie about 64 bytes deeper than its temp dir.
RAY_TEMP_DIR_MAX_LEN = 40
RAY_LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
RAY_SIDE_PORTS = ("--dashboard-port", "--dashboard-agent-listen-port",
                  "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                  "--metrics-export-port", "--ray-client-server-port")  # fmt: skip


class StackError(Exception):
    """A problem the user can fix; printed as one line."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    with socket.socket() as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def port_free(host: str, port: int) -> bool:
    """Nothing listens there (SO_REUSEADDR, as servers bind: TIME_WAIT does not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return not port_open(_client_host(host), port, timeout=0.2)


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (our own URL)
            return 200 <= resp.status < 300
    except (OSError, ValueError):
        return False


def ray_answers(address: str, env: dict[str, str]) -> bool:
    """`ray status`: the GCS at host:port is up, takes our token and knows a node."""
    host, port = address.rsplit(":", 1)
    if not port_open(host, int(port)):
        return False
    argv = [executable("ray"), "status", "--address", address]
    try:
        return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _answers(name: str, url: str, client_env: dict[str, str]) -> bool:
    if name == "ray":
        return ray_answers(url, {**os.environ, **client_env})
    return http_ok(f"{url}/health" if name == "mlflow" else f"{url}/api/health")


def executable(name: str) -> str:
    """The console script from this interpreter's environment, else from PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise StackError(f"'{name}' is not installed beside {sys.executable} nor on PATH")
    return found


def ray_token(state: Path) -> Path:
    """This stack's own Ray auth token (Ray 2.60 enables token auth by default)."""
    path = state / "ray_auth_token"
    if not path.exists():
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
            fh.write(secrets.token_hex(32))
    return path


def ray_client_env(token: Path) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def ray_temp_dir(state: Path, name: str = "ray") -> Path:
    """<state>/<name> when short enough for Ray's Unix sockets, else a new folder in /tmp."""
    inside = state / name
    if len(str(inside)) <= RAY_TEMP_DIR_MAX_LEN:
        inside.mkdir(parents=True, exist_ok=True)
        return inside
    return Path(tempfile.mkdtemp(prefix="vae-stack-ray-", dir="/tmp"))


def client_env(state: Path, host: str, ports: dict[str, int]) -> dict[str, str]:
    """What a pipeline process needs to use the stack (written to env.sh)."""
    client = _client_host(host)
    env = {
        "MLFLOW_TRACKING_URI": f"http://{client}:{ports['mlflow']}",
        "PREFECT_API_URL": f"http://{client}:{ports['prefect']}/api",
        "RAY_ADDRESS": f"{client}:{ports['ray']}",
        **ray_client_env(state / "ray_auth_token"),
    }
    return env | (RAY_LOOPBACK_ONLY if ipaddress.ip_address(client).is_loopback else {})


def commands(state: Path, host: str, ports: dict[str, int], ray_temp: Path) -> dict:
    """Service name -> (argv, env); absolute paths under `state` (Ray's workers change dir)."""
    env = client_env(state, host, ports)
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *RAY_LOOPBACK_ONLY)}
    mlflow = [executable("mlflow"), "server", "--host", host, "--port", str(ports["mlflow"]),
              "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
              "--artifacts-destination", str(state / "mlartifacts"), "--workers", "1"]  # fmt: skip
    prefect = [executable("prefect"), "server", "start", "--host", host,
               "--port", str(ports["prefect"])]  # fmt: skip
    ray = [executable("ray"), "start", "--head", "--block", "--port", str(ports["ray"]),
           "--node-ip-address", _client_host(host), "--dashboard-host", _client_host(host),
           *[x for flag in RAY_SIDE_PORTS for x in (flag, str(free_port(host)))],
           "--temp-dir", str(ray_temp), "--disable-usage-stats"]  # fmt: skip
    ray_env = {k: v for k, v in env.items() if k.startswith("RAY_") and k != "RAY_ADDRESS"}
    ray_env |= {"RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5"}
    prefect_env = {"PREFECT_HOME": str(state / "prefect"), "PREFECT_API_URL": env["PREFECT_API_URL"],
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
    # MLflow's GenAI job runner (7 huey consumer processes) is not used by the pipeline.
    mlflow_env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return {"mlflow": (mlflow, base | mlflow_env), "prefect": (prefect, base | prefect_env),
            "ray": (ray, base | ray_env)}  # fmt: skip


def launch(argv: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    """Start argv in a session of its own, appending its output to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def process_tree(pid: int, create_time: float | None) -> list[psutil.Process]:
    """The live processes of what was started as `pid`: itself (unless the pid now belongs to a
    process started at another time), its descendants and its session's other members."""
    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        leader = psutil.Process(pid)
        if create_time is not None and abs(leader.create_time() - create_time) > 0.01:
            return []  # the pid was reused: nothing of ours is left in its session
        found = {p.pid: p for p in [leader, *leader.children(recursive=True)]}
    for proc in psutil.process_iter():
        with contextlib.suppress(OSError):
            if proc.pid not in found and os.getsid(proc.pid) == pid:
                found[proc.pid] = proc  # left its parent, e.g. a Ray worker whose raylet died
    return _alive(list(found.values()))


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def _signal(procs: list[psutil.Process], how: str) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            getattr(proc, how)()


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (alive := _alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def stop_processes(trees: list[list[psutil.Process]], leader_first: list[bool], grace: float):
    """SIGTERM each tree (its leader alone where leader_first: a `ray start` supervisor), wait
    up to `grace` s, then SIGTERM what is left, then SIGKILL."""
    for procs, first in zip(trees, leader_first, strict=True):
        _signal(procs[:1] if first else procs, "terminate")
    alive = _wait_gone([p for procs in trees for p in procs], grace)
    _signal(alive, "terminate")
    alive = _wait_gone(alive, 5.0)
    _signal(alive, "kill")
    if alive := _wait_gone(alive, 5.0):
        raise StackError(f"processes {[p.pid for p in alive]} survived SIGKILL")


def load_state(state: Path) -> dict:
    path = state / STATE_FILE
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError as exc:
        raise StackError(f"{path} is not valid JSON ({exc}); delete it and run 'up' again") from exc


def _save(state: Path, record: dict) -> None:
    (state / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _check_host(host: str) -> None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError as exc:
        raise StackError(f"--host {host!r} is not an IP address; use e.g. 127.0.0.1") from exc
    if address.version != 4:
        raise StackError(f"--host {host}: only IPv4 addresses are supported; use 127.0.0.1")
    if not address.is_loopback:
        print(f"warning: binding {host}: MLflow and Prefect have no authentication and will be "
              "reachable from other machines, and so will Ray's servers on every interface; "
              "keep 127.0.0.1 unless the network is trusted", file=sys.stderr)  # fmt: skip


def up(state: Path, host: str, ports: dict[str, int], timeout: float) -> dict[str, str]:
    """Start the three services, wait until each answers, write env.sh; stop all on failure."""
    _check_host(host)
    state.mkdir(parents=True, exist_ok=True)
    running = [f"{n} (pid {i['pid']})" for n, i in load_state(state).get("services", {}).items()
               if process_tree(i["pid"], i.get("create_time"))]  # fmt: skip
    if running:
        raise StackError(f"stack in {state} is already running: {', '.join(running)}; "
                         "run 'down' first")  # fmt: skip
    for name, port in ports.items():
        if not port_free(host, port):
            raise StackError(f"port {port} on {host} for {name} is in use; stop what holds it "
                             f"or pass --{name}-port with a free port")  # fmt: skip
    env = client_env(state, host, ports)
    urls = {"mlflow": env["MLFLOW_TRACKING_URI"], "ray": env["RAY_ADDRESS"],
            "prefect": env["PREFECT_API_URL"].removesuffix("/api")}  # fmt: skip
    ray_token(state)
    ray_temp = ray_temp_dir(state)
    record: dict = {"host": host, "ports": ports, "env": env, "services": {}}
    procs = {}
    try:
        for name, (argv, service_env) in commands(state, host, ports, ray_temp).items():
            log = state / f"{name}.log"
            procs[name] = proc = launch(argv, service_env, log, state)
            (state / f"{name}.pid").write_text(f"{proc.pid}\n")
            record["services"][name] = {"pid": proc.pid, "url": urls[name], "log": str(log),
                                        "create_time": psutil.Process(proc.pid).create_time()}  # fmt: skip
            _save(state, record)
        record["services"]["ray"]["temp_dir"] = str(ray_temp)
        _save(state, record)
        _wait_until_answering(state, procs, record, timeout)
    except BaseException:
        down(state, quiet=True)
        if not ray_temp.is_relative_to(state):
            shutil.rmtree(ray_temp, ignore_errors=True)
        raise
    (state / ENV_FILE).write_text("\n".join(
        ["# Written by infra/local/stack.py up; `source` it to use the local stack.",
         *[f"export {k}={v}" for k, v in env.items()]]) + "\n")  # fmt: skip
    return env


def _wait_until_answering(state: Path, procs: dict, record: dict, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = dict(procs)
    while pending:
        for name, proc in list(pending.items()):
            if proc.poll() is not None:
                raise StackError(f"{name} exited with code {proc.returncode} while starting; "
                                 f"see {state / f'{name}.log'}")  # fmt: skip
            url = record["services"][name]["url"]
            if _answers(name, url, record["env"]):
                print(f"{name:<8} up      {url}", file=sys.stderr)
                del pending[name]
        if pending and time.monotonic() > deadline:
            name = next(iter(pending))
            raise StackError(f"{name} did not answer on {record['services'][name]['url']} "
                             f"within {timeout:.0f} s; see {state / f'{name}.log'} "
                             "(or raise --timeout)")  # fmt: skip
        if pending:
            time.sleep(0.5)


def down(state: Path, grace: float = 20.0, quiet: bool = False) -> list[str]:
    """Stop what `up` recorded: SIGTERM, then SIGKILL after `grace` seconds."""
    services = load_state(state).get("services", {})
    trees = {n: process_tree(i["pid"], i.get("create_time")) for n, i in services.items()}
    running = {n: t for n, t in trees.items() if t}
    stop_processes(list(running.values()), [n == "ray" for n in running], grace)
    for name in running:
        if not quiet:
            print(f"{name:<8} stopped (pid {services[name]['pid']})", file=sys.stderr)
    ray_temp = services.get("ray", {}).get("temp_dir")
    if ray_temp and not Path(ray_temp).is_relative_to(state):
        shutil.rmtree(ray_temp, ignore_errors=True)
    for name in DEFAULT_PORTS:
        (state / f"{name}.pid").unlink(missing_ok=True)
    (state / ENV_FILE).unlink(missing_ok=True)
    (state / STATE_FILE).unlink(missing_ok=True)
    return list(running)


def status(state: Path) -> dict[str, str]:
    """Service name -> 'running', 'not answering' or 'stopped'."""
    record = load_state(state)
    result = {}
    for name in DEFAULT_PORTS:
        info = record.get("services", {}).get(name)
        if not info or not process_tree(info["pid"], info.get("create_time")):
            result[name] = "stopped"
        else:
            ok = _answers(name, info["url"], record.get("env", {}))
            result[name] = "running" if ok else "not answering"
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python infra/local/stack.py",
        description="Start, inspect or stop a local MLflow server, Prefect server and Ray head.",
    )
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="pid files, logs, databases and env.sh (default: %(default)s)")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_up = sub.add_parser("up", help="start the services and wait until each answers")
    p_up.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    for name, port in DEFAULT_PORTS.items():
        p_up.add_argument(f"--{name}-port", type=int, default=port,
                          help=f"{name} port (default: %(default)s)")  # fmt: skip
    p_up.add_argument("--timeout", type=float, default=120.0,
                      help="seconds to wait for the services to answer")  # fmt: skip
    p_down = sub.add_parser("down", help="stop the processes that 'up' started")
    p_down.add_argument("--grace", type=float, default=20.0,
                        help="seconds between SIGTERM and SIGKILL")  # fmt: skip
    sub.add_parser("status", help="report each service: running, not answering or stopped")
    return parser


def _print_up(state: Path, env: dict[str, str]) -> None:
    print(f"stack is up; state, logs and env.sh in {state}")
    print(f"  MLflow UI   {env['MLFLOW_TRACKING_URI']}")
    print(f"  Prefect UI  {env['PREFECT_API_URL'].removesuffix('/api')}")
    print(f"  Ray head    {env['RAY_ADDRESS']}")
    print(f"use it from a shell with: source {state / ENV_FILE}")
    for key, val in env.items():
        print(f"export {key}={val}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    state = args.state_dir.expanduser().resolve()
    try:
        if args.command == "up":
            ports = {name: getattr(args, f"{name}_port") for name in DEFAULT_PORTS}
            _print_up(state, up(state, args.host, ports, args.timeout))
        elif args.command == "down":
            if not down(state, grace=args.grace):
                print(f"nothing to stop in {state}", file=sys.stderr)
        else:
            report, info = status(state), load_state(state).get("services", {})
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
