"""Test infrastructure: several Ray nodes on this machine, a head and nodes that join it.

Each node is a `ray start --block` in a session of its own, with its own temp dir and free side
ports, and all share one auth token, so a multi-node cluster fits on one machine beside other
Rays (tests/infra/test_multinode.py). The local stack's head (infra/local/stack.py) keeps every
Ray server on 127.0.0.1, which also keeps other nodes out; these nodes are given 127.0.0.1 too,
but `ray start` advertises the machine's primary address for them and, in Ray 2.60, listens on
every interface (token authentication is what refuses other machines).

    head = ray_node(state, port=free_port())            # or join="127.0.0.1:<port>"
    start(head, state); wait_until_answering(head, timeout=90); stop(head)
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def _stack_module():
    name = "infra_local_stack"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "local" / "stack.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


stack = _stack_module()
free_port, StackError, ray_client_env = stack.free_port, stack.StackError, stack.ray_client_env


@dataclass
class RayNode:
    name: str
    url: str  # the head's GCS address (host:port)
    argv: list[str]
    env: dict[str, str]
    temp_dir: Path
    port: int  # the head's GCS port, or a joined node's raylet port
    proc: subprocess.Popen | None = field(default=None)


def ray_node(state: Path, *, port: int | None = None, join: str | None = None,
             num_cpus: int | None = None, name: str = "ray") -> RayNode:  # fmt: skip
    """A head listening on `port`, or a node joining the head at `join` (host:port)."""
    if (port is None) == (join is None):
        raise ValueError("give either port (a head) or join (a node joining that head)")
    side = stack.RAY_SIDE_PORTS
    if join is None:
        role, url = (
            ["--head", "--port", str(port), "--dashboard-host", "127.0.0.1"],
            f"127.0.0.1:{port}",
        )
    else:  # a node has no dashboard of its own
        port, url, side = free_port(), join, [f for f in side if f != "--dashboard-port"]
        role = ["--address", join, "--node-manager-port", str(port)]
    role += ["--num-cpus", str(num_cpus)] if num_cpus is not None else []
    temp_dir = stack.ray_temp_dir(state, name)
    argv, env = stack.ray_start(role, temp_dir, stack.ray_token(state), side)
    return RayNode(name, url, argv, env, temp_dir, port)


def start(node: RayNode, state: Path) -> None:
    node.proc = stack.launch(node.argv, node.env, state / f"{node.name}.log", state)


def wait_until_answering(node: RayNode, state: Path, timeout: float) -> None:
    """The node's port is open and the head answers `ray status`; one line if not."""
    deadline = time.monotonic() + timeout
    while not (_listens(node.port) and stack.answers("ray", node.url, node.env)):
        if node.proc.poll() is not None:
            raise StackError(f"{node.name} exited with code {node.proc.returncode} while "
                             f"starting; see {state / f'{node.name}.log'}")  # fmt: skip
        if time.monotonic() > deadline:
            raise StackError(f"{node.name} did not answer within {timeout:.0f} s")
        time.sleep(0.5)


def _listens(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def stop(node: RayNode, state: Path, grace: float = 20.0) -> None:
    """SIGTERM to the `ray start` supervisor alone (it drains the node), SIGKILL to what is
    left after `grace`; the temp dir goes when it lies outside `state`."""
    if node.proc is not None:
        tree = stack.process_tree(node.proc.pid, None)
        if tree:
            stack.stop_processes([tree], [True], grace)
        node.proc.wait(timeout=10)
    if not node.temp_dir.is_relative_to(state):
        shutil.rmtree(node.temp_dir, ignore_errors=True)
