"""A local stack for the pipeline: an MLflow server, a Prefect server and a Ray head on 127.0.0.1.

    python infra/local/stack.py up | status | down      # then: source .stack/env.sh

Each service is a plain `mlflow server`, `prefect server start` or `ray start --head --block`
in a session of its own. `down` stops what `up` recorded and nothing else (psutil), never with
`ray stop`, which would stop every Ray on the machine. infra/README.md describes the state
folder, the ports, and why Ray needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 to stay on loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

HOST = "127.0.0.1"
DEFAULT_STATE_DIR = Path(__file__).resolve().parents[2] / ".stack"
DEFAULT_PORTS = {"mlflow": 5000, "prefect": 4200, "ray": 6379}
STATE_FILE, ENV_FILE = "stack.json", "env.sh"
# Ray's Unix sockets (at most 107 bytes) lie about 64 bytes deeper than its temp dir.
RAY_TEMP_DIR_MAX_LEN = 40
# Ray's single-machine mode: on Linux `ray start` otherwise swaps 127.0.0.1 for the primary
# address and listens on every interface. Its drivers need it too, so env.sh exports it.
RAY_LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Free ports chosen at start, so that the stack runs beside another Ray on this machine.
RAY_SIDE_PORTS = ("--dashboard-port", "--dashboard-agent-listen-port",
                  "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                  "--metrics-export-port", "--ray-client-server-port")  # fmt: skip


class StackError(Exception):
    """A problem the user can fix; printed as one line."""


def free_port(host: str = HOST) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_free(port: int) -> bool:
    """A server could listen on it (SO_REUSEADDR, as servers bind: TIME_WAIT does not count)."""
    with socket.socket() as sock, contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        return True
    return False


def answers(name: str, url: str, env: dict[str, str]) -> bool:
    """MLflow's or Prefect's health URL says OK; for Ray, `ray status` with `env` (the GCS at
    host:port is up, takes our token and knows a node)."""
    try:
        if name == "ray":
            host, port = url.rsplit(":", 1)
            argv = [executable("ray"), "status", "--address", url]
            with socket.create_connection((host, int(port)), timeout=1):
                pass  # `ray status` would wait for a GCS that is not listening yet
            return subprocess.run(argv, env=os.environ | env, capture_output=True,
                                  timeout=30).returncode == 0  # fmt: skip
        health = f"{url}/health" if name == "mlflow" else f"{url}/api/health"
        with urllib.request.urlopen(health, timeout=2) as resp:  # noqa: S310 (our own URL)
            return 200 <= resp.status < 300
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return False


def executable(name: str) -> str:
    """The console script beside this interpreter (the venv's), else from PATH."""
    beside = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if found := shutil.which(name, path=beside):
        return found
    raise StackError(f"'{name}' is not installed beside {sys.executable} nor on PATH")


def ray_token(state: Path) -> Path:
    """This stack's own Ray auth token (Ray 2.60 enables token auth by default)."""
    path = state / "ray_auth_token"
    if not path.exists():
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
            fh.write(os.urandom(32).hex())
    return path


def ray_client_env(token: Path) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def ray_temp_dir(state: Path, name: str = "ray") -> Path:
    """<state>/<name> when short enough for Ray's Unix sockets, else a new folder in /tmp."""
    inside = state / name
    if len(str(inside)) > RAY_TEMP_DIR_MAX_LEN:
        return Path(tempfile.mkdtemp(prefix="vae-stack-ray-", dir="/tmp"))
    inside.mkdir(parents=True, exist_ok=True)
    return inside


def ray_start(role: list[str], temp_dir: Path, token: Path, side=RAY_SIDE_PORTS) -> tuple:
    """(argv, env) of a `ray start --block` on 127.0.0.1 with our token and free side ports."""
    argv = [executable("ray"), "start", *role, "--block", "--node-ip-address", HOST,
            *[x for flag in side for x in (flag, str(free_port()))],
            "--temp-dir", str(temp_dir), "--disable-usage-stats"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *RAY_LOOPBACK_ONLY)}
    env |= ray_client_env(token) | {"RAY_USAGE_STATS_ENABLED": "0",
                                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5"}  # fmt: skip
    return argv, env


def client_env(state: Path, ports: dict[str, int]) -> dict[str, str]:
    """What a pipeline process needs to use the stack (written to env.sh)."""
    return {"MLFLOW_TRACKING_URI": f"http://{HOST}:{ports['mlflow']}",
            "PREFECT_API_URL": f"http://{HOST}:{ports['prefect']}/api",
            "RAY_ADDRESS": f"{HOST}:{ports['ray']}",
            **ray_client_env(state / "ray_auth_token"), **RAY_LOOPBACK_ONLY}  # fmt: skip


def commands(state: Path, ports: dict[str, int], ray_temp: Path) -> dict:
    """Service name -> (argv, env); absolute paths under `state` (Ray's workers change dir)."""
    mlflow = [executable("mlflow"), "server", "--host", HOST, "--port", str(ports["mlflow"]),
              "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
              "--artifacts-destination", str(state / "mlartifacts"), "--workers", "1"]  # fmt: skip
    prefect = [executable("prefect"), "server", "start", "--host", HOST,
               "--port", str(ports["prefect"])]  # fmt: skip
    head = ["--head", "--port", str(ports["ray"]), "--dashboard-host", HOST]
    ray, ray_env = ray_start(head, ray_temp, ray_token(state))
    prefect_env = {"PREFECT_HOME": str(state / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "PREFECT_API_URL": f"http://{HOST}:{ports['prefect']}/api"}  # fmt: skip
    # MLflow's GenAI job runner (7 huey consumer processes) is not used by the pipeline.
    return {"mlflow": (mlflow, os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),
            "prefect": (prefect, os.environ | prefect_env),
            "ray": (ray, ray_env | RAY_LOOPBACK_ONLY)}  # fmt: skip


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
        with contextlib.suppress(OSError):  # e.g. a Ray worker whose raylet died: reparented
            if os.getsid(proc.pid) == pid:
                found.setdefault(proc.pid, proc)
    return _alive(found.values())


def _alive(procs) -> list[psutil.Process]:
    def alive(proc: psutil.Process) -> bool:
        try:  # a zombie is gone for us: only its parent can reap it
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    return [p for p in procs if alive(p)]


def stop_processes(trees: list[list[psutil.Process]], leader_first: list[bool], grace: float):
    """SIGTERM each tree (its leader alone where leader_first: a `ray start` supervisor drains
    its node and stops its own children); after `grace` s SIGTERM what is left, SIGKILL 5 s
    later, and give up 5 s after that."""
    alive = [p for procs in trees for p in procs]
    for procs, first in zip(trees, leader_first, strict=True):
        _signal(procs[:1] if first else procs, "terminate")
    for then, wait in (("terminate", grace), ("kill", 5.0), (None, 5.0)):
        deadline = time.monotonic() + wait
        while (alive := _alive(alive)) and time.monotonic() < deadline:
            time.sleep(0.2)
        _signal(alive if then else [], then)
    if alive:
        raise StackError(f"processes {[p.pid for p in alive]} survived SIGKILL")


def _signal(procs: list[psutil.Process], how: str | None) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            getattr(proc, how)()


def load_state(state: Path) -> dict:
    path = state / STATE_FILE
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError as exc:
        raise StackError(f"{path} is not valid JSON ({exc}); delete it and run 'up' again") from exc


def _running(state: Path) -> dict[str, list[psutil.Process]]:
    services = load_state(state).get("services", {})
    trees = {n: process_tree(i["pid"], i.get("create_time")) for n, i in services.items()}
    return {name: tree for name, tree in trees.items() if tree}


def up(state: Path, ports: dict[str, int], timeout: float) -> dict[str, str]:
    """Start the three services, wait until each answers, write env.sh; stop all on failure."""
    state.mkdir(parents=True, exist_ok=True)
    if running := [f"{name} (pid {tree[0].pid})" for name, tree in _running(state).items()]:
        raise StackError(f"stack in {state} is already running: {', '.join(running)}; "
                         "run 'down' first")  # fmt: skip
    for name, port in ports.items():
        if not port_free(port):
            raise StackError(f"port {port} on {HOST} for {name} is in use; stop what holds it "
                             f"or pass --{name}-port with a free port")  # fmt: skip
    env, ray_temp = client_env(state, ports), ray_temp_dir(state)
    urls = {"mlflow": env["MLFLOW_TRACKING_URI"], "ray": env["RAY_ADDRESS"],
            "prefect": env["PREFECT_API_URL"].removesuffix("/api")}  # fmt: skip
    record: dict = {"ports": ports, "env": env, "ray_temp_dir": str(ray_temp), "services": {}}
    procs: dict[str, subprocess.Popen] = {}
    (state / STATE_FILE).write_text(json.dumps(record))  # from here on `down` cleans up
    try:
        for name, (argv, service_env) in commands(state, ports, ray_temp).items():
            procs[name] = proc = launch(argv, service_env, state / f"{name}.log", state)
            (state / f"{name}.pid").write_text(f"{proc.pid}\n")
            record["services"][name] = {"pid": proc.pid, "url": urls[name],
                                        "create_time": psutil.Process(proc.pid).create_time()}  # fmt: skip
            (state / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _wait_until_answering(state, procs, urls, env, timeout)
    except BaseException:
        down(state, quiet=True)
        raise
    (state / ENV_FILE).write_text("\n".join(
        ["# Written by infra/local/stack.py up; `source` it to use the local stack.",
         *[f"export {k}={v}" for k, v in env.items()]]) + "\n")  # fmt: skip
    return env


def _wait_until_answering(state: Path, procs: dict, urls: dict, env: dict, timeout: float):
    deadline, pending = time.monotonic() + timeout, dict(procs)
    while pending:
        for name, proc in list(pending.items()):
            if proc.poll() is not None:
                raise StackError(f"{name} exited with code {proc.returncode} while starting; "
                                 f"see {state / f'{name}.log'}")  # fmt: skip
            if answers(name, urls[name], env):
                print(f"{name:<8} up      {urls[name]}", file=sys.stderr)
                del pending[name]
        if pending and time.monotonic() > deadline:
            name = next(iter(pending))
            raise StackError(f"{name} did not answer on {urls[name]} within {timeout:.0f} s; "
                             f"see {state / f'{name}.log'} (or raise --timeout)")  # fmt: skip
        time.sleep(0.5 if pending else 0)


def down(state: Path, grace: float = 20.0, quiet: bool = False) -> list[str]:
    """Stop what `up` recorded: SIGTERM, then SIGKILL after `grace` seconds. Data stays."""
    record, running = load_state(state), _running(state)
    stop_processes(list(running.values()), [n == "ray" for n in running], grace)
    for name in [] if quiet else running:
        print(f"{name:<8} stopped (pid {record['services'][name]['pid']})", file=sys.stderr)
    ray_temp = record.get("ray_temp_dir")
    if ray_temp and not Path(ray_temp).is_relative_to(state):
        shutil.rmtree(ray_temp, ignore_errors=True)
    for path in [*(f"{name}.pid" for name in DEFAULT_PORTS), ENV_FILE, STATE_FILE]:
        (state / path).unlink(missing_ok=True)
    return list(running)


def status(state: Path) -> int:
    """Print each service: running, not answering or stopped; 0 when all are running."""
    record, running, answering = load_state(state), _running(state), 0
    for name in DEFAULT_PORTS:
        url = record["services"][name]["url"] if name in running else ""
        ok = bool(url) and answers(name, url, record["env"])
        what = "running" if ok else "not answering" if url else "stopped"
        print(f"{name:<8} {what:<14} {url}".rstrip())
        answering += ok
    return 0 if answering == len(DEFAULT_PORTS) else 1


def build_parser() -> argparse.ArgumentParser:
    shown = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}
    parser = argparse.ArgumentParser(
        prog="python infra/local/stack.py", **shown,
        description="Start, inspect or stop a local MLflow server, Prefect server and Ray head.",
    )  # fmt: skip
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="pid files, logs, databases and env.sh")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_up = sub.add_parser("up", **shown, help="start the services and wait until each answers")
    for name, port in DEFAULT_PORTS.items():
        p_up.add_argument(f"--{name}-port", type=int, default=port, help=f"{name} port")
    p_up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for answers")
    p_down = sub.add_parser("down", **shown, help="stop the processes that 'up' started")
    p_down.add_argument("--grace", type=float, default=20.0, help="seconds to SIGKILL")
    sub.add_parser("status", help="report each service: running, not answering or stopped")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    state = args.state_dir.expanduser().resolve()
    try:
        if args.command == "status":
            return status(state)
        if args.command == "down" and not down(state, grace=args.grace):
            print(f"nothing to stop in {state}", file=sys.stderr)
        if args.command == "up":
            env = up(state, {n: getattr(args, f"{n}_port") for n in DEFAULT_PORTS}, args.timeout)
            print(f"stack is up; state, logs and env.sh in {state}\n"
                  f"  MLflow UI   {env['MLFLOW_TRACKING_URI']}\n"
                  f"  Prefect UI  {env['PREFECT_API_URL'].removesuffix('/api')}\n"
                  f"  Ray head    {env['RAY_ADDRESS']}\n"
                  f"use it from a shell with: source {state / ENV_FILE}")  # fmt: skip
            print("\n".join(f"export {key}={val}" for key, val in env.items()))
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; stopped what had started", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
