"""Staging on the cluster: Ray tasks write the shards in parallel, byte-identical to one process.

Each task reads the source itself (on its node: no data goes through the driver), deals every
sample to its split's shards exactly as single-process staging does, and writes only the shards
assigned to it: the compression and encoding, nine tenths of staging's time, are split among
the tasks while the deal stays the same, so every shard and the manifest are byte-identical to
those of one process (tests/data/test_parallel_staging.py). A local target folder is written on
the driver's node (tasks are pinned there); an object-store prefix from any node, each shard
uploaded as soon as it is written.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tqdm.auto import tqdm

from pipelines.data.shards.assignment import assign_shards
from pipelines.data.shards.format import SPLITS, claims_name
from pipelines.errors import PipelineError
from pipelines.params import ClusterParams, DataParams

log = logging.getLogger(__name__)


def stage_workers(d: DataParams) -> int:
    """How many Ray tasks stage: data.stage_workers (1: this process, no Ray). Not implied by a
    cluster address: the retrain flow's first Ray Client connection would then come from its
    staging task. A Ray Client head that fails to start a client's server (ray 2.60, once in the
    multi-host test) is tried again by ensure_ray (cluster.py), whichever task connects first."""
    return d.stage_workers


def _ownership(plan, workers: int) -> list[dict[str, frozenset[int]]]:
    """Each task's new shards (positions per split), balanced by their samples: the dealing
    gives a split's shards n / shards samples each, give or take one."""
    units = [(s, i) for s in SPLITS for i in range(plan.shards[s])]
    sizes = [plan.counts[s] // max(1, plan.shards[s]) + 1 for s, _ in units]
    out = []
    for picked in assign_shards(sizes, workers):
        owned = {s: set() for s in SPLITS}
        for u in picked:
            owned[units[u][0]].add(units[u][1])
        out.append({s: frozenset(v) for s, v in owned.items()})
    return [o for o in out if any(o.values())]


def stream_on_ray(
    d: DataParams, root: Path, cluster: ClusterParams, n: int, folder: Path, plan, sink, bar: tqdm
):
    """What staging's one pass gives (its _Stream), from data.stage_workers Ray tasks, each writing its
    share of the new shards into folder, or uploading them through sink.on_closed's target;
    None when the tasks could not reach folder (a Ray Client driver: stage here instead)."""
    import ray

    from pipelines.cluster import (
        cancel_unfinished,
        ensure_ray,
        signals_kept_through_ray,
        task_error_line,
    )
    from pipelines.storage import is_remote, store_env

    workers = stage_workers(d)
    ensure_ray(cluster)
    target = getattr(sink.on_closed, "target", None)  # the object-store prefix, if staging there
    options: dict = {"num_cpus": 1}
    if target is None:  # a local folder: on the driver's node, where the folder is
        from ray.util.client import ray as client
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if client.is_connected():  # Ray Client: this machine is no node of the cluster
            log.info("staging into a local folder over Ray Client: in this process")
            return None

        node = ray.get_runtime_context().get_node_id()
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
    elif is_remote(str(target)):
        options["runtime_env"] = {"env_vars": store_env()}  # the store's keys
    task = ray.remote(_stage_task).options(**options)
    shares = _ownership(plan, workers)
    refs = [
        task.remote(
            d,
            str(root),
            str(folder),
            plan,
            owned,
            None if target is None else str(target),
            index,
        )  # fmt: skip
        for index, owned in enumerate(shares)
    ]
    try:
        with signals_kept_through_ray():
            results = _gather(ray, refs, bar, n)
    except BaseException as exc:
        cancel_unfinished(refs)
        err = task_error_line(exc)
        if err is None:
            raise
        raise err from exc
    return _merged(results, sink)


def _gather(ray, refs: list, bar: tqdm, n: int) -> list:
    pending, done = list(refs), {}
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            done[ref] = ray.get(ref)
            bar.update(n * len(done) // len(refs) - bar.n)  # tasks read everything; share done
    return [done[ref] for ref in refs]


def _merged(results: list, sink):
    """One _Stream from the tasks': every task saw every sample, so their digests and
    statistics agree; the entries are each split's shards in number order, as one writer
    lists them."""
    streams = [stream for stream, _ in results]
    first = streams[0]
    if any((s.digest, s.stats) != (first.digest, first.stats) for s in streams[1:]):
        raise PipelineError(
            "the staging tasks read different data (the source changed while staging?); "
            "re-run 'vae-pipeline stage'"
        )
    for _, uploaded in results:
        sink.taken.extend(uploaded)
    entries = {s: sorted((e for st in streams for e in st.entries[s]), key=lambda e: e["name"])
               for s in SPLITS}  # fmt: skip
    first.entries = entries
    return first


def _stage_task(
    data: DataParams, root: str, folder: str, plan, owned: dict, target: str | None, task: int
) -> tuple:
    """One task: the source read whole, its share of the new shards written (and uploaded,
    then removed locally, when target is an object-store prefix). Returns the pass's _Stream
    and the names it uploaded."""
    import tempfile

    from pipelines.data.sources.catalog import open_source
    from pipelines.data.staging import _stream
    from pipelines.storage import location, remote_errors, upload

    src = open_source(data, Path(root))
    uploaded: list[str] = []
    on_closed = None
    local = Path(folder)
    if target is not None:
        prefix = location(target)
        local = Path(tempfile.mkdtemp(prefix="vae-pipeline-stage-task-"))

        def on_closed(path: Path) -> None:
            uploaded.append(path.name)  # before the PUT: a cut-off one may have landed
            with remote_errors(target):
                # Claimed first, in this task's own claims object (see CLAIMS_NAME).
                (prefix / claims_name(task)).write_text(json.dumps(sorted(uploaded)))
                upload(path, prefix / path.name)
            path.unlink()

    try:
        bar = tqdm(disable=True)
        stream = _stream(src, data, local, plan, bar, on_closed, owned)
    finally:
        if target is not None:
            for leftover in local.iterdir():
                leftover.unlink()
            os.rmdir(local)
    return stream, uploaded
