"""The Ray cluster a stage runs on: connect to it (or start one of our own), check it can place
what is asked before any work starts, and keep SIGTERM meaning SIGTERM through Ray's calls.

Training and the embed job both use it; it knows nothing of either.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from pipelines.errors import Interrupted, PipelineError
from pipelines.params import ClusterParams
from vae.errors import VAEError


def cluster_address(cluster: ClusterParams) -> str | None:
    """The Ray cluster to use: cluster.address, else $RAY_ADDRESS; None for a local Ray."""
    return cluster.address or os.environ.get("RAY_ADDRESS") or None


def local_ray_cpus(cluster: ClusterParams) -> int:
    """The CPUs a Ray of our own gets: this machine's, or more if the training workers ask."""
    need = int(cluster.max_workers * cluster.cpus_per_worker + 0.999)
    return max(os.cpu_count() or 1, need)


# A Ray of our own runs on this one machine, none of whose nodes can be drained or preempted:
# Ray Train's preemption watcher, a process per training polling for drains, would only add
# its start (about 2 s on 2 cores) to every training. Its workers inherit this environment.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def prepare_local_ray_env() -> None:
    """Before starting a Ray of our own; a value the user set is kept."""
    for name, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(name, value)


def ensure_ray(cluster: ClusterParams) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cluster_address(cluster)
    handler = signal.getsignal(signal.SIGTERM)
    # Workers' output (Ray Train's per-report lines, MLflow's INFO logs, Ray's own warnings)
    # stays in Ray's log files unless asked for: our progress bars and one-line errors say
    # what a person needs, and a failure's cause reaches the driver as an exception anyway.
    quiet = {
        "log_to_driver": verbose(),
        "logging_level": logging.INFO if verbose() else logging.ERROR,
    }
    if address:
        _check_ray_answers(address, "cluster.address" if cluster.address else "$RAY_ADDRESS")
        init_with_retry(ray.init, address, quiet)
    else:
        # "local": a Ray of our own. Without it ray.init joins whatever cluster the last `ray
        # start` on this machine left running (ray_current_cluster), someone else's included.
        prepare_local_ray_env()
        ray.init(
            address="local", num_cpus=local_ray_cpus(cluster), include_dashboard=False,
            **quiet,
        )  # fmt: skip
    if not verbose():
        _say_where_ray_logs()
    # ray.init installs a C-level SIGTERM handler that dumps a stack and aborts (exit -6), over
    # ours (the CLI's, which raises Interrupted so the run is closed and one line printed).
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def serves_state_api() -> bool:
    """Whether the connected Ray cluster runs its dashboard, which serves Ray's state API. Ray
    Train's PlacementGroupCleaner (a helper actor that removes a dead controller's placement
    group) asks that API whether the controller lives; with no dashboard (ray[default] not
    installed, or started without one) each ask waits about 20 s for an address that never
    comes, so the cleaner can never clean, and stopping it held every training's end 12 s.
    The cluster records the dashboard's address even when none runs: so ask that address."""
    from pipelines.timeouts import connect_timeout_s

    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        address = _internal_kv_get(
            ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD
        )
    except Exception:  # a private API: if it moved, keep Ray's defaults
        return True
    if not address:
        return False
    host, _, port = address.decode().rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), connect_timeout_s()).close()
    except (OSError, ValueError):
        return False
    return True


# Ray 2.60's Ray Client proxier on the head now and then fails to start the server it runs for
# each client ("Starting Ray client server failed. See ray_client_server_<port>.err"); seen
# once in CI (tests/infra/test_multihost.py), where a new connection got a server and worked.
CLIENT_SERVER_FAILED = "Starting Ray client server failed"
CLIENT_RETRIES = 2
CLIENT_BACKOFF_S = 2.0


def init_with_retry(
    init: Callable[..., Any], address: str, kwargs: dict, sleep: Callable[[float], Any] = time.sleep
) -> None:
    """init(address=address, **kwargs), tried again up to CLIENT_RETRIES times, 2 s and then
    4 s later, when a Ray Client (ray://) head failed to start this client's server; never past
    the network deadline (pipelines.timeouts), and any other failure at once."""
    from pipelines.timeouts import network_timeout_s

    deadline = time.monotonic() + network_timeout_s()
    for attempt in range(CLIENT_RETRIES + 1):
        try:
            init(address=address, **kwargs)
            return
        except Exception as exc:
            wait = CLIENT_BACKOFF_S * 2**attempt
            flake = address.startswith("ray://") and CLIENT_SERVER_FAILED in str(exc)
            if not flake or attempt == CLIENT_RETRIES or time.monotonic() + wait > deadline:
                raise
        print(f"Ray Client: the head at {address} could not start a server for this client; "
              f"trying again in {wait:g} s", file=sys.stderr)  # fmt: skip
        sleep(wait)


VERBOSE_ENV = "VAE_PIPELINE_VERBOSE"  # set by --verbose; inherited by flows and their tasks


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def _say_where_ray_logs() -> None:
    """Once per process: where the workers' output went instead of the terminal."""
    try:
        import ray

        logs = ray._private.worker.global_worker.node.get_logs_dir_path()  # noqa: SLF001
    except Exception:  # noqa: BLE001 - a Ray Client session or a changed internal: no path
        logs = "the Ray head's session logs folder"
    print(f"Ray workers' logs: {logs} (--verbose shows them here)", file=sys.stderr)


@contextlib.contextmanager
def native_stderr_hidden() -> Iterator[None]:
    """Ray's C++ core worker in this process writes its ERROR lines to descriptor 2 as well as
    to its own log file (python-core-driver-*.log, in the folder _say_where_ray_logs names):
    Ray Data's actor pools make it print one for every pool ("constructor arguments in the
    object store", ray-project/ray#57733), which reads as a failure when nothing failed. While
    this is open, descriptor 2 goes to /dev/null, so those lines are only in Ray's file, and
    Python's sys.stderr (our bars, log records, warnings) to the terminal as before."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)  # not inheritable: children started meanwhile get /dev/null, as Ray's do
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    # It owns a descriptor of its own, left to close when the last reference goes: a log
    # handler made meanwhile (it takes sys.stderr as it is then) keeps writing to the terminal.
    terminal = open(os.dup(saved), "w", buffering=1, encoding=sys.stderr.encoding)  # noqa: SIM115
    try:
        with contextlib.redirect_stderr(terminal):
            yield
    finally:
        terminal.flush()
        os.dup2(saved, 2)
        os.close(saved)


# The HTTP/2 connection preface and an empty SETTINGS frame (RFC 9113, section 3.4).
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _check_ray_answers(address: str, setting: str) -> None:
    """A cluster address nothing listens on: ray.init would retry it for minutes."""
    if address == "auto":
        found = _auto_address(setting)
        _check_ray_answers(found, f"{setting} auto, which found the last head started here,")
        return
    if address == "local" or ("://" in address and not address.startswith("ray://")):
        return  # a new local Ray, or a client plug-in's scheme
    hostport = address.removeprefix("ray://").split("/")[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise PipelineError(
            f"{setting} {address} is not a Ray address; give host:port of the head node "
            "(e.g. 10.0.0.5:6379, or ray://10.0.0.5:10001 for Ray Client) or 'auto'"
        )
    from pipelines.timeouts import TIMEOUT_ENV, connect_timeout_s, network_timeout_s

    wait = network_timeout_s()
    try:
        with socket.create_connection((host.strip("[]"), int(port)), connect_timeout_s()) as s:
            # Ray's GCS and client server speak gRPC: an HTTP/2 server answers a client preface
            # with its SETTINGS frame at once. Something that takes the connection and says
            # nothing would keep ray.init retrying for minutes.
            s.settimeout(wait)
            s.sendall(_HTTP2_PREFACE)
            if not s.recv(9):
                raise ConnectionResetError(errno.ECONNRESET, "closed the connection")
    except TimeoutError as exc:
        raise PipelineError(
            f"{setting} {address}: something listens there but does not answer as a Ray "
            f"cluster within {wait:g} s; check the address (the head's GCS port, 6379 by "
            f"default, or ray://host:10001 for Ray Client) or raise {TIMEOUT_ENV}"
        ) from exc
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise PipelineError(
            f"{setting} {address}: no Ray cluster answers there ({why.lower()}); start it "
            "('ray start --head') or fix the address"
        ) from exc


def _auto_address(setting: str) -> str:
    """The address Ray's 'auto' means: the head the last `ray start` on this machine recorded
    (in Ray's temp folder), else a GCS running here. The record outlives a head that was killed
    outright, and ray.init would retry its address for minutes."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        found = canonicalize_bootstrap_address("auto")
    except ConnectionError:
        found = None
    if not found:
        raise PipelineError(
            f"{setting} auto: no Ray cluster was started on this machine; start one "
            "('ray start --head') or give the head's host:port"
        )
    return found


def check_resources(cluster: ClusterParams) -> None:
    """Refuse in one line workers Ray could never place (it would wait for them forever): GPUs
    this machine lacks for a local Ray, or CPUs/GPUs a cluster lacks once connected to it."""
    import ray

    t = cluster
    address = cluster_address(cluster)
    if not ray.is_initialized() and not address:
        # A local Ray gets the CPUs its workers ask for (ensure_ray); GPUs it cannot invent.
        if t.use_gpu:
            import torch

            gpus = torch.cuda.device_count()
            if gpus < t.min_workers:
                raise PipelineError(
                    f"cluster.use_gpu with cluster.num_workers={t.workers_text()} needs "
                    f"{t.min_workers} GPU(s), but this machine has {gpus} (CUDA devices "
                    "visible); set cluster.use_gpu=false, lower cluster.num_workers, or set "
                    "cluster.address to a cluster with GPUs"
                )
        return
    ensure_ray(cluster)
    try:
        nodes = ray.nodes()
    except Exception:  # noqa: BLE001 - a client without the node table: the totals will do
        nodes = [{"Alive": True, "Resources": ray.cluster_resources()}]
    room, cpus, gpus = _room(nodes, t.cpus_per_worker, t.use_gpu)
    # Elastic training starts with whatever fits from min_workers up; a fixed count must fit.
    if room < t.min_workers:
        each = f"{t.cpus_per_worker:g} CPU" + (" + 1 GPU" if t.use_gpu else "")
        raise PipelineError(
            f"cluster.num_workers={t.workers_text()} workers of {each} each do not fit the Ray "
            f"cluster ({address or 'this process'}): its live nodes have {cpus:g} CPUs and "
            f"{gpus:g} GPUs, room for {room} such worker(s); lower cluster.num_workers or "
            "cluster.cpus_per_worker, set cluster.use_gpu=false, or add nodes"
        )


def check_fits_a_node(cluster: ClusterParams, cpus: float, setting: str) -> None:
    """Refuse in one line a Ray task or actor of `cpus` CPUs that no live node can hold (Ray
    would wait for such a node forever, silently). For a local Ray, before it starts."""
    import ray

    if not ray.is_initialized() and not cluster_address(cluster):
        largest = float(local_ray_cpus(cluster))
    else:
        ensure_ray(cluster)
        try:
            nodes = ray.nodes()
        except Exception:  # noqa: BLE001 - a client without the node table: use the totals
            nodes = [{"Alive": True, "Resources": ray.cluster_resources()}]
        largest = max(
            (float(n.get("Resources", {}).get("CPU", 0)) for n in nodes if n.get("Alive")),
            default=0,
        )
    if cpus > largest + 1e-9:
        raise PipelineError(
            f"{setting}={cpus:g} CPUs per actor fits no node of the Ray cluster (the largest "
            f"has {largest:g}); lower {setting} to at most {largest:g}, or add larger nodes"
        )


def _room(nodes: list[dict], cpus_per_worker: float, use_gpu: bool) -> tuple[int, float, float]:
    """(workers that fit, CPUs, GPUs) over the live nodes: a worker runs on one node."""
    room, cpus, gpus = 0, 0.0, 0.0
    for node in nodes:
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        cpu, gpu = float(res.get("CPU", 0)), float(res.get("GPU", 0))
        cpus, gpus = cpus + cpu, gpus + gpu
        fit = int(cpu / cpus_per_worker + 1e-9)
        room += min(fit, int(gpu + 1e-9)) if use_gpu else fit
    return room, cpus, gpus


def user_error(exc: BaseException) -> VAEError | None:
    """The error of ours behind a Ray task failure, if any (Ray wraps it once or twice)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        # RayTaskError(PipelineError) is a VAEError too, but its text is the remote traceback.
        if isinstance(exc, VAEError) and not isinstance(cause, BaseException):
            return exc
        exc = cause or exc.__cause__
    return None


def task_error_line(exc: BaseException, prefix: str = "") -> PipelineError | None:
    """Our one-line error behind a failed Ray task (its first line: Ray appends its own advice
    below it), or None when exc is not one of ours raised inside a task."""
    cause = user_error(exc) if isinstance(exc, Exception) else None
    if cause is None or cause is exc:
        return None
    return PipelineError(prefix + (str(cause).splitlines() or [""])[0])


def cancel_unfinished(refs: list) -> None:
    """Cancel the tasks of refs still running (after a failure or an interrupt). Never a
    finished one: cancelling it trips a check in Ray's core worker ("Tried to complete task
    that was not pending") that aborts this process."""
    import ray

    if not refs:
        return
    try:
        ready, running = ray.wait(refs, num_returns=len(refs), timeout=0)
    except Exception:  # noqa: BLE001 - Ray going down: nothing left to cancel
        return
    for ref in running:
        ray.cancel(ref, force=True)


# -- training -------------------------------------------------------------------------------


@contextlib.contextmanager
def signals_kept_through_ray() -> Iterator[None]:
    """Ray's blocking calls turn the exception a signal handler raises into a bare
    KeyboardInterrupt, so SIGTERM (pipelines.errors.Interrupted) would be reported as Ctrl-C:
    note the signal as it comes and raise it again as Interrupted."""
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous) or threading.current_thread() is not threading.main_thread():
        yield
        return
    seen: list[int] = []

    def note(signum: int, frame: Any) -> None:
        seen.append(signum)
        previous(signum, frame)

    signal.signal(signal.SIGTERM, note)
    try:
        yield
    except KeyboardInterrupt as exc:
        if seen and not isinstance(exc, Interrupted):
            raise Interrupted(seen[-1]) from exc
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
