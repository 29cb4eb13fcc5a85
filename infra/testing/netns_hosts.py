"""Test infrastructure: hosts that share nothing but the network, on one Linux machine.

Each "host" is a network namespace with its own address on a private bridge (iproute2's
`ip netns` and a veth pair per host), and its own working directory: processes on different
hosts reach each other only over the network, as on real machines. Used by the multi-host test
(tests/infra/test_multihost.py) to run an object store, PostgreSQL, an MLflow server, a Ray head
and a Ray worker node each on its own host, and the pipeline's CLI from a client host.

    net = Network.create("vt1", ["s3", "head", "node1", "client"], workdir)
    proc = net.spawn("head", ["ray", "start", ...], env)
    net.ip("head")          # 10.<x>.<y>.11
    net.destroy()           # kills every process of every host, removes namespaces and bridge

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2; without them `Network.create` fails
with one line saying so. `destroy` is safe to call twice and after a failed `create`;
`destroy_leftovers(prefix)` removes what a killed run left behind.

Only the standard library is used here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


class HostsError(Exception):
    """Multi-host mode cannot run here; the message says what is missing."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise HostsError(f"'ip {' '.join(args)}' failed: {proc.stderr.strip()[:200]}")
    return proc


def check_privileges() -> None:
    """One line saying what is missing, before anything is created."""
    if shutil.which("ip") is None:
        raise HostsError("multi-host mode needs iproute2's 'ip' command (apt-get install iproute2)")
    if os.geteuid() != 0:
        raise HostsError(
            "multi-host mode needs root (network namespaces and a bridge: CAP_NET_ADMIN); run "
            "it as root, or use the single-host stack (infra/local/stack.py up)"
        )
    probe = f"vaeprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    _ip("netns", "del", probe, check=False)
    if made.returncode != 0:
        raise HostsError(
            "multi-host mode needs 'ip netns add' to work (it failed: "
            f"{made.stderr.strip()[:120]}); run as root outside a restricted container"
        )


def _subnet(prefix: str) -> str:
    """A private /24 per prefix (10.x.y.0), so two runs with other prefixes do not collide."""
    digest = hashlib.sha256(prefix.encode()).digest()
    return f"10.{100 + digest[0] % 100}.{digest[1]}"


@dataclass
class Network:
    prefix: str  # short: interface names are limited to 15 characters
    hosts: list[str]
    workdir: Path
    bridge: str = ""
    created: list[str] = field(default_factory=list)  # namespaces made so far
    procs: list[subprocess.Popen] = field(default_factory=list)
    inits: dict[str, int] = field(default_factory=dict)  # host -> pid of its PID namespace's init

    @classmethod
    def create(cls, prefix: str, hosts: list[str], workdir: Path) -> Network:
        check_privileges()
        destroy_leftovers(prefix)
        net = cls(prefix, list(hosts), workdir, bridge=f"{prefix}br")
        try:
            net._build()
        except BaseException:
            net.destroy()
            raise
        return net

    def _build(self) -> None:
        net = _subnet(self.prefix)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{net}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, host in enumerate(self.hosts):
            ns, outside, inside = self.namespace(host), f"{self.prefix}v{i}", f"{self.prefix}p{i}"
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            _ip("link", "set", inside, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{self.ip(host)}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            (self.workdir / host).mkdir(parents=True, exist_ok=True)
            self.inits[host] = self._start_init(ns)

    def _start_init(self, ns: str) -> int:
        """A process holding the host's PID namespace (pid 1 inside it); commands join it."""
        holder = subprocess.Popen(
            ["ip", "netns", "exec", ns, "unshare", "--pid", "--fork", "--mount-proc",
             "--kill-child=SIGKILL", "sleep", "infinity"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self.procs.append(holder)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            children = Path(f"/proc/{holder.pid}/task/{holder.pid}/children")
            with contextlib.suppress(OSError):
                found = children.read_text().split()
                if found:
                    return int(found[0])
            time.sleep(0.05)
        raise HostsError(f"could not start a PID namespace for {ns} (unshare --pid failed)")

    def iface(self, host: str) -> str:
        """The host's network interface, as named inside its namespace (for GLOO_SOCKET_IFNAME:
        gloo otherwise advertises the address the hostname resolves to, 127.0.0.1 here)."""
        return f"{self.prefix}p{self.hosts.index(host)}"

    def namespace(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def ip(self, host: str) -> str:
        return f"{_subnet(self.prefix)}.{11 + self.hosts.index(host)}"

    def home(self, host: str) -> Path:
        """The host's own working directory (no other host reads it)."""
        return self.workdir / host

    def _enter(self, host: str) -> list[str]:
        """The command prefix that runs a program on host: its network namespace, and its PID
        and mount namespaces (its own /proc), so that no host sees another's processes. Ray,
        for one, looks for a raylet among the processes it can see and would attach a driver
        to another host's node."""
        return ["nsenter", "-t", str(self.inits[host]), "-n", "-p", "-m", f"--wd={self.home(host)}"]

    def spawn(self, host: str, argv: list[str], env: dict[str, str], log: str) -> subprocess.Popen:
        """Start argv on host (in its own session, cwd = its home), output to <home>/<log>."""
        out = open(self.home(host) / log, "ab")  # noqa: SIM115 - the process keeps it
        proc = subprocess.Popen(
            [*self._enter(host), *argv], env=env,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        out.close()
        self.procs.append(proc)
        return proc

    def run(self, host: str, argv: list[str], env: dict[str, str], timeout: float = 600):
        """Run argv on host to its end; the completed process (output captured)."""
        return subprocess.run(
            [*self._enter(host), *argv], env=env,
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    @contextlib.contextmanager
    def unplugged(self, host: str):
        """The host's cable pulled for the duration: its link on the bridge goes down (its
        processes and their state stay), and comes back up on exit."""
        outside = f"{self.prefix}v{self.hosts.index(host)}"
        _ip("link", "set", outside, "down")
        try:
            yield
        finally:
            _ip("link", "set", outside, "up")

    def kill_host(self, host: str) -> None:
        """SIGKILL every process on host, as a machine losing power would (the host itself,
        its namespaces, stays, so its services can be started again)."""
        init = self.inits[host]
        keep = {init, *_ancestors(init)}
        for pid in _ns_pids(self.namespace(host)):
            if pid not in keep:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def destroy(self) -> None:
        """Every host's programs get SIGTERM at once and one grace between them (they shut
        down side by side, as machines would; a namespace's init ignores SIGTERM, so a grace
        per host used to be spent in full, one after another), then SIGKILL for what is left,
        the inits and their holders named by pid as well, in case a listing missed them."""
        namespaces = list(reversed(self.created))
        keep = {pid for init in self.inits.values() for pid in (init, *_ancestors(init))}
        for ns in namespaces:
            for pid in set(_ns_pids(ns)) - keep:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(set(_ns_pids(ns)) - keep for ns in namespaces):
            time.sleep(0.2)
        for ns in namespaces:
            _kill_namespace(ns)
        for pid in self.inits.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.kill()
                proc.wait(timeout=5)
        for ns in namespaces:
            _ip("netns", "del", ns, check=False)
        self.created.clear()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in self.inits.values()):
            time.sleep(0.1)
        if self.bridge:
            _ip("link", "del", self.bridge, check=False)


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first, then the parent),
    or None when pid is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    """pid runs (a zombie has ended: only its parent's wait is missing)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _ancestors(pid: int) -> list[int]:
    """The parents of pid up to (not including) pid 1."""
    found = []
    while pid > 1 and (stat := _stat(pid)) is not None:
        pid = int(stat[1])
        found.append(pid)
    return found


def _ns_pids(ns: str) -> list[int]:
    proc = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def _kill_namespace(ns: str) -> None:
    """SIGKILL every process in ns and wait (up to 10 s) until none is listed."""
    for pid in _ns_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _ns_pids(ns) and time.monotonic() < deadline:
        time.sleep(0.1)


def destroy_leftovers(prefix: str) -> None:
    """Namespaces and the bridge a killed run with this prefix left behind."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    for line in listed:
        name = line.split(" ")[0]
        if name.startswith(f"{prefix}-"):
            _kill_namespace(name)
            _ip("netns", "del", name, check=False)
    _ip("link", "del", f"{prefix}br", check=False)
