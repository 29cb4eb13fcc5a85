"""Staging on the cluster: Ray tasks write the shards in parallel, byte-identical to one process.

Each task reads the source itself (on its node: no data goes through the driver) and deals
every sample to its shard exactly as single-process staging does, from the split codes the
driver dealt once from the keys (one byte a sample, put once in the object store); it reads,
hashes, counts and writes only the samples of the shards given to it
(pipelines.data.staging_pass), and never reads a chunk of the source with none of them. The
driver puts the shards' digests and statistics together in the manifest's order, so every
shard and the manifest are byte-identical to those of one process
(tests/data/test_parallel_staging.py), and no task reads every sample. An append's earlier
shards are only hashed (read, not written): how much cheaper that is than writing comes
from timing a read against a write on a few samples here, and shares out the work. A local
target folder is written on the driver's node (tasks are pinned there); an object-store prefix
from any node, each shard uploaded as soon as it is written.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

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


def _ownership(plan, workers: int, read_cost: float) -> list[frozenset]:
    """Each task's shards (staging_pass units). A new shard costs its samples read
    (read_cost each, a write being 1) and written; an earlier generation's only read. Largest
    first, each to the task it leaves least loaded; tasks left with nothing are dropped."""
    units = plan.units()
    cost = [
        plan.unit_samples(u) * (read_cost + (1.0 if plan.generations[u[0]].write else 0.0))
        for u in units
    ]  # fmt: skip
    loads = [0.0] * workers
    owned: list[set] = [set() for _ in range(workers)]
    for u in sorted(range(len(units)), key=lambda u: (-cost[u], u)):
        t = min(range(workers), key=lambda t: (loads[t], t))
        loads[t] += cost[u]
        owned[t].add(units[u])
    return [frozenset(o) for o in owned if o]


def _read_cost(src) -> float:
    """Reading a sample (with its hash) against writing it into a shard,
    both timed here on the source's first samples through the code the tasks run. Only the
    tasks' shares depend on it, never a byte they write."""
    import tempfile
    from functools import partial

    from pipelines.data.shards.writer import SplitWriter, encode_sample, label_bytes

    # Reads of _PROBE samples, up to 1,024 samples or a quarter of a second (an image
    # folder's decodes must not keep the driver long), the first one not timed: it pays for
    # imports and for touching fresh memory, which a task's long pass pays once (timed on the
    # first read alone, sprites looked 2.6x dearer to read than they are in the tasks).
    chunks, took, spent = [], [], 0.0
    for a in range(0, min(src.n, 8 * _PROBE), _PROBE):
        seconds, chunk = _timed_read(src, a, min(src.n, a + _PROBE))
        chunks.append(chunk)
        took.append(seconds)
        spent += seconds
        if spent > 0.25:
            break
    if not chunks:
        return 0.0
    timed = slice(1 if len(chunks) > 1 else 0, None)
    read = sum(took[timed]) / sum(len(c.keys) for c in chunks[timed])
    c = chunks[-1]
    with tempfile.TemporaryDirectory(prefix="vae-pipeline-stage-timing-") as tmp:
        writer = SplitWriter(Path(tmp), "train", len(c.keys), 1, 0)
        started = time.perf_counter()
        for i, key in enumerate(c.keys):
            label = label_bytes(c.labels, i)
            factors = None if c.factors is None else c.factors[i]
            writer.write(partial(encode_sample, key, c.x[i], label, factors))
        writer.close()
        write = (time.perf_counter() - started) / len(c.keys)
    return read / max(write, 1e-9)


_PROBE = 128  # samples per timed read


def _timed_read(src, a: int, b: int):
    import hashlib

    started = time.perf_counter()
    c = src.read(a, b)
    h = hashlib.sha256()
    for key, x in zip(c.keys, np.ascontiguousarray(c.x), strict=True):
        h.update(key.encode())
        h.update(x)
    return time.perf_counter() - started, c


def stream_on_ray(
    d: DataParams, root: Path, cluster: ClusterParams, src, folder: Path, plan, sink, bar: tqdm
):
    """What staging's one pass gives (a staging_pass.PassResult), from data.stage_workers Ray
    tasks, each writing its share of the new shards into folder, or uploading them through
    sink.on_closed's target; None when the tasks could not reach folder (a Ray Client driver:
    stage here instead)."""
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
    # Only an append's earlier shards cost reads alone; otherwise every shard costs the same
    # per sample and the timing is not needed.
    hashed_only = any(not gen.write for gen in plan.generations)
    shares = _ownership(plan, workers, _read_cost(src) if hashed_only else 0.0)
    plan_ref = ray.put(plan)  # its split codes (a byte a sample) stored once, not per task
    where = None if target is None else str(target)
    refs = [
        task.remote(d, str(root), str(folder), plan_ref, owned, where, index)
        for index, owned in enumerate(shares)
    ]
    try:
        with signals_kept_through_ray():
            results = _gather(ray, refs, bar, src.n - plan.generations[0].start)
    except BaseException as exc:
        cancel_unfinished(refs)
        err = task_error_line(exc)
        if err is None:
            raise
        raise err from exc
    return _merged(results, sink, src.version)


def _gather(ray, refs: list, bar: tqdm, n: int) -> list:
    pending, done = list(refs), {}
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            done[ref] = ray.get(ref)
            bar.update(n * len(done) // len(refs) - bar.n)  # by tasks done: each has a share
    return [done[ref] for ref in refs]


def _merged(results: list, sink, version: str):
    """One PassResult from the tasks': every shard's digest and statistics (each task owned
    its own), and each split's new shards in number order, as one writer lists them. Every task
    opened the source at the version the driver planned from, or the source changed while
    staging (a file replaced, images added) and the shards would mix the two."""
    from pipelines.data.staging_pass import PassResult

    if any(seen != version for _, _, seen in results):
        raise PipelineError(
            "the source changed while staging (the staging tasks read another version than "
            "this process planned from); re-run 'vae-pipeline stage' once it is complete"
        )
    merged = PassResult({s: [] for s in SPLITS}, {}, {})
    for passed, uploaded, _ in results:
        sink.taken.extend(uploaded)
        merged.digests.update(passed.digests)
        merged.stats.update(passed.stats)
        for s in SPLITS:
            merged.entries[s].extend(passed.entries[s])
    for entries in merged.entries.values():
        entries.sort(key=lambda e: e["name"])
    return merged


def _stage_task(
    data: DataParams, root: str, folder: str, plan, owned: frozenset, target: str | None, task: int
) -> tuple:
    """One task: its shards hashed and counted, the new ones written, and uploaded then removed
    locally when target is an object-store prefix. Returns its PassResult, the names it
    uploaded and the source version it read."""
    import tempfile

    from pipelines.data.sources.catalog import open_source
    from pipelines.data.staging_pass import stream_pass
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
        passed = stream_pass(src, local, plan, None, on_closed, owned)
    finally:
        if target is not None:
            for leftover in local.iterdir():
                leftover.unlink()
            os.rmdir(local)
    return passed, uploaded, src.version
