"""The multi-host stack: an object store, PostgreSQL, an MLflow server (runs in PostgreSQL,
artifacts in the object store: the production set-up), a Prefect server, a Ray head, Ray worker
nodes and a client, each on its own host of infra/testing/netns_hosts.py (network, PID and /proc
of its own). Test infrastructure, not part of the product.

    with start_cluster(workdir) as c:      # c.net, c.client_env, c.nodes, c.store, c.bucket
        c.net.run("client", ["vae-pipeline", "train", ...], c.client_env)

The client is a Ray node with no CPUs: `ray.init(address=...)` attaches a driver to a raylet on
its own machine, as on a submit or login node. Each Ray node gets the object store's settings
(on real machines: an instance role or a Secret) and GLOO_SOCKET_IFNAME (gloo would otherwise
advertise the address the hostname resolves to). With `pin_cpus`, each CPU host's processes are
pinned to cores of their own (`taskset`), so hosts do not share cores as real machines do not.

Used by tests/infra/test_multihost.py and benchmarks/cluster_scaling.py. Needs root.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


def _hosts_module():
    name = "infra_testing_netns_hosts"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("netns_hosts.py")
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


hosts = _hosts_module()
BIN = Path(sys.executable).parent
BUCKET = "vae-cluster"
KEY, SECRET = "cluster", "cluster-secret"  # the test store's only credentials


@dataclass
class Cluster:
    net: object  # hosts.Network
    client_env: dict[str, str]
    nodes: dict[str, str]  # node address -> Ray node id
    store: dict[str, str]  # the AWS_* settings of the object store
    bucket: str = BUCKET

    def restart_ray(self, host: str) -> None:
        """Start host's Ray node again (after kill_host), joining the head."""
        token = (self.net.home("head") / "ray_token").read_text()
        _start_ray(self.net, host, token, self.store, self.net.ip("head"), self.pins)

    pins: dict[str, str] | None = None


def wait_http(url: str, proc, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited early")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{what} did not answer at {url}")


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "MLFLOW_"))}
    return env | {"RAY_USAGE_STATS_ENABLED": "0", "DVC_NO_ANALYTICS": "1"} | extra


def _start_ray(net, host: str, token: str, store: dict, head: str | None, pins) -> None:
    home = net.home(host)
    (home / "ray_token").write_text(token)
    temp = Path(f"/tmp/{net.prefix}{host}")  # short: Ray's socket paths are limited
    shutil.rmtree(temp, ignore_errors=True)
    role = ["--head", "--port", "6379", "--include-dashboard", "false"] if head is None else [
        "--address", f"{head}:6379"]  # fmt: skip
    cpus = "0" if host == "client" else "1"
    argv = [str(BIN / "ray"), "start", *role, "--node-ip-address", net.ip(host),
            "--num-cpus", cpus, "--block", "--temp-dir", str(temp), "--disable-usage-stats"]  # fmt: skip
    if pins and host in pins:
        argv = ["taskset", "-c", pins[host], *argv]
    env = base_env(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(home / "ray_token"),
        GLOO_SOCKET_IFNAME=net.iface(host), **store,
    )  # fmt: skip
    net.spawn(host, argv, env, "ray.log")


_NODES = """
import json, sys, time, ray
ray.init(log_to_driver=False)
deadline = time.monotonic() + 90
want = int(sys.argv[1])
while len([n for n in ray.nodes() if n["Alive"]]) < want and time.monotonic() < deadline:
    time.sleep(0.5)
print(json.dumps({n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}))
"""


def _start_store(net) -> Callable[[], dict[str, str]]:
    """Spawn the object store; the returned call waits for it, makes the bucket and gives its
    AWS_* settings (so the other hosts start while it does)."""
    endpoint = _store_env(net)["AWS_ENDPOINT_URL"]
    proc = net.spawn(
        "store", [str(BIN / "moto_server"), "-H", net.ip("store"), "-p", "9000"], base_env(),
        "s3.log",
    )  # fmt: skip

    def ready() -> dict[str, str]:
        wait_http(f"{endpoint}/moto-api/", proc, "the object store")
        import boto3

        boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
            region_name="us-east-1",
        ).create_bucket(Bucket=BUCKET)  # fmt: skip
        return _store_env(net)

    return ready


def _store_env(net) -> dict[str, str]:
    """The store's AWS_* settings (the same before it answers)."""
    return {"AWS_ENDPOINT_URL": f"http://{net.ip('store')}:9000", "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip


def postgres_bin(name: str) -> str:
    """A PostgreSQL program from Debian's /usr/lib/postgresql/<version>/bin (the newest), or
    else from PATH. (initdb finds `postgres` beside its own path, not through symlinks.)"""
    debian = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    found = debian[0] if debian else shutil.which(name)
    if found is None:
        raise hosts.HostsError(
            f"PostgreSQL's {name} is not installed; apt-get install postgresql (make test does)"
        )
    return str(found)


def _start_postgres(net) -> str:
    """PostgreSQL on the db host (as the postgres user: it refuses to run as root), trusting
    the private network; returns the SQLAlchemy URI of an empty `mlflow` database."""
    import pwd

    user = pwd.getpwnam("postgres")
    data = Path(f"/tmp/{net.prefix}pg")  # not under a root-only pytest folder
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(mode=0o700)
    os.chown(data, user.pw_uid, user.pw_gid)
    # As postgres, from a folder it may enter (the host's home is root's alone).
    as_pg = ["runuser", "-u", "postgres", "--", "env", "-C", str(data)]
    init = net.run("db", [*as_pg, postgres_bin("initdb"), "-D", str(data / "db"), "-U",
                          "postgres", "--auth=trust"], base_env(), timeout=120)  # fmt: skip
    if init.returncode != 0:
        raise RuntimeError(f"initdb failed: {init.stderr[-1000:]}")
    with open(data / "db" / "pg_hba.conf", "a") as hba:
        hba.write("host all all 0.0.0.0/0 trust\n")  # the hosts' private bridge only
    ip = net.ip("db")
    net.spawn("db", [*as_pg, postgres_bin("postgres"), "-D", str(data / "db"),
                     "-c", f"listen_addresses={ip}", "-c", f"unix_socket_directories={data}"],
              base_env(), "postgres.log")  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        made = net.run("db", [*as_pg, postgres_bin("createdb"), "-h", ip, "mlflow"], base_env())
        if made.returncode == 0:
            return f"postgresql+psycopg2://postgres@{ip}:5432/mlflow"
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL did not start: {made.stderr[-500:]}")
        time.sleep(0.5)


def _start_mlflow(net, store: dict[str, str], backend: str) -> str:
    url = f"http://{net.ip('mlflow')}:5000"
    proc = net.spawn("mlflow", [
        str(BIN / "mlflow"), "server", "--host", net.ip("mlflow"), "--port", "5000",
        "--backend-store-uri", backend,
        "--artifacts-destination", f"s3://{BUCKET}/mlartifacts", "--workers", "1",
    ], base_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **store), "mlflow.log")  # fmt: skip
    wait_http(f"{url}/health", proc, "the MLflow server", timeout=180)
    return url


def _start_prefect(net) -> Callable[[], str]:
    """Spawn `prefect server` on its own host (its database in the host's home); the returned
    call waits for it and gives the API URL."""
    url = f"http://{net.ip('prefect')}:4200"
    env = base_env(
        PREFECT_HOME=str(net.home("prefect")), PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_URL=f"{url}/api",
    )  # fmt: skip
    argv = [str(BIN / "prefect"), "server", "start", "--host", net.ip("prefect"), "--port", "4200"]
    proc = net.spawn("prefect", argv, env, "prefect.log")

    def ready() -> str:
        wait_http(f"{url}/api/health", proc, "the Prefect server", timeout=180)
        return f"{url}/api"

    return ready


@contextlib.contextmanager
def start_cluster(
    workdir: Path, workers: int = 1, pin_cpus: bool = False, prefix: str | None = None
) -> Iterator[Cluster]:
    """store, mlflow, head, node1..node<workers>, client; everything goes on exit."""
    names = ["store", "db", "mlflow", "prefect", "head",
             *[f"node{i}" for i in range(1, workers + 1)], "client"]  # fmt: skip
    net = hosts.Network.create(prefix or f"vt{os.getpid() % 10000}", names, workdir)
    cpu_hosts = ["head", *names[5:-1]]
    pins = (
        {h: str(i % (os.cpu_count() or 1)) for i, h in enumerate(cpu_hosts)} if pin_cpus else None
    )
    try:
        # Every service starts at once and is waited for when needed: started one after the
        # other, the hosts' start-up took a minute and a half on 2 cores.
        store_ready = _start_store(net)
        prefect_ready = _start_prefect(net)
        store = _store_env(net)
        token = os.urandom(32).hex()
        _start_ray(net, "head", token, store, None, pins)
        backend = _start_postgres(net)
        mlflow_url = _start_mlflow(net, store_ready(), backend)
        prefect_api = prefect_ready()
        for host in [*cpu_hosts[1:], "client"]:
            _start_ray(net, host, token, store, net.ip("head"), pins)
        client_env = base_env(
            RAY_ADDRESS=f"{net.ip('head')}:6379", RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(net.home("client") / "ray_token"),
            MLFLOW_TRACKING_URI=mlflow_url, PREFECT_API_URL=prefect_api,
            PREFECT_HOME=str(net.home("client") / "prefect"), **store,
        )  # fmt: skip
        argv = [sys.executable, "-c", _NODES, str(len(cpu_hosts) + 1)]
        out = net.run("client", argv, client_env, timeout=150)
        if out.returncode != 0:
            raise RuntimeError(f"the Ray cluster did not form: {out.stderr[-2000:]}")
        nodes = json.loads(out.stdout.strip().splitlines()[-1])
        yield Cluster(net, client_env, nodes, store, pins=pins)
    finally:
        net.destroy()
        for host in [*names, "pg"]:
            shutil.rmtree(f"/tmp/{net.prefix}{host}", ignore_errors=True)
