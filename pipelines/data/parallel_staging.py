"""Staging on the cluster: Ray tasks write the shards in parallel, byte-identical to one process.

Each task reads the source itself (on its node: no data goes through the driver) and deals
every sample to its split's shards exactly as single-process staging does, from the keys alone;
it reads, encodes and compresses only the samples of the shards assigned to it. The first task
also reads every sample, for the manifest's content digest and statistics (both defined over
every sample in order), and is given fewer shards to make up for it: how many fewer comes from
timing a read against a write on a few samples here. Every shard and the manifest are
byte-identical to those of one process (tests/data/test_parallel_staging.py). A local target
folder is written on the driver's node (tasks are pinned there); an object-store prefix from
any node, each shard uploaded as soon as it is written.
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


def _ownership(plan, workers: int, n: int, read_cost: float) -> list[dict[str, frozenset[int]]]:
    """Each task's new shards (positions per split); task 0 first, always. Task 0 reads all n
    samples anyway; another task reads only its shards' samples. A shard costs its samples to
    write (the dealing gives a split's shards counts / shards each, give or take one), plus
    read_cost per sample on a task other than 0: largest shard first, to the task it leaves
    least loaded."""
    units = [(s, i) for s in SPLITS for i in range(plan.shards[s])]
    sizes = [plan.counts[s] // max(1, plan.shards[s]) + 1 for s, _ in units]
    loads = [read_cost * n] + [0.0] * (workers - 1)
    owned: list[dict[str, set[int]]] = [{s: set() for s in SPLITS} for _ in range(workers)]
    for u in sorted(range(len(units)), key=lambda u: (-sizes[u], u)):
        cost = [sizes[u] * (1.0 + (read_cost if t else 0.0)) for t in range(workers)]
        t = min(range(workers), key=lambda t: (loads[t] + cost[t], t))
        loads[t] += cost[t]
        owned[t][units[u][0]].add(units[u][1])
    out = [{s: frozenset(v) for s, v in o.items()} for o in owned]
    return out[:1] + [o for o in out[1:] if any(o.values())]


def _read_cost(src, d: DataParams) -> float:
    """Reading a sample (with its key's split and its hash) against writing it into a shard,
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
        seconds, chunk = _timed_read(src, d, a, min(src.n, a + _PROBE))
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


def _timed_read(src, d: DataParams, a: int, b: int):
    import hashlib

    from pipelines.data.splitting import split_of

    started = time.perf_counter()
    c = src.read(a, b)
    h = hashlib.sha256()
    for key, x in zip(c.keys, np.ascontiguousarray(c.x), strict=True):
        split_of(key, d.val_fraction, d.test_fraction, d.split)
        h.update(key.encode())
        h.update(x)
    return time.perf_counter() - started, c


def stream_on_ray(
    d: DataParams, root: Path, cluster: ClusterParams, src, folder: Path, plan, sink, bar: tqdm
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
    shares = _ownership(plan, workers, src.n, _read_cost(src, d))
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
            results = _gather(ray, refs, bar, src.n)
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
            bar.update(n * len(done) // len(refs) - bar.n)  # tasks read everything; share done
    return [done[ref] for ref in refs]


def _merged(results: list, sink, version: str):
    """One _Stream from the tasks': the digest and statistics of task 0 (the one that read
    every sample); the entries are each split's shards in number order, as one writer lists
    them. Every task opened the source at the version the driver planned from, or the source
    changed while staging (a file replaced, images added) and the shards would mix the two."""
    if any(seen != version for _, _, seen in results):
        raise PipelineError(
            "the source changed while staging (the staging tasks read another version than "
            "this process planned from); re-run 'vae-pipeline stage' once it is complete"
        )
    streams = [stream for stream, _, _ in results]
    first = streams[0]
    for _, uploaded, _ in results:
        sink.taken.extend(uploaded)
    entries = {s: sorted((e for st in streams for e in st.entries[s]), key=lambda e: e["name"])
               for s in SPLITS}  # fmt: skip
    first.entries = entries
    return first


def _not_written() -> dict:
    raise AssertionError("a sample of a shard this task does not write was encoded")


def _stream_own(src, d: DataParams, folder: Path, plan, on_closed, owned: dict):
    """The pass of a task other than task 0: every key is dealt as _stream deals it, and only
    the samples of the shards in owned are read (Source.rows), encoded and written. No digest
    and no statistics: task 0's are the manifest's."""
    from functools import partial

    from pipelines.data.shards.writer import encode_sample, label_bytes
    from pipelines.data.sources.base import CHUNK
    from pipelines.data.splitting import split_of
    from pipelines.data.staging import _Stream, _writers

    writers = _writers(folder, plan, on_closed, owned)
    seen = dict.fromkeys(SPLITS, 0)
    for a in range(plan.start, src.n, CHUNK):
        b = min(src.n, a + CHUNK)
        keys = src.keys(a, b)
        splits = [split_of(key, d.val_fraction, d.test_fraction, d.split) for key in keys]
        mine = []
        for i, s in enumerate(splits):
            if writers[s].owns(seen[s]):
                mine.append(i)
            seen[s] += 1
        c = src.rows(a, b, mine) if mine else None
        picked = dict(zip(mine, range(len(mine)), strict=True))
        for i, key in enumerate(keys):
            j = picked.get(i)
            if j is None:
                writers[splits[i]].write(_not_written)
                continue
            label = label_bytes(c.labels, j)
            factors = None if c.factors is None else c.factors[j]
            writers[splits[i]].write(partial(encode_sample, key, c.x[j], label, factors))
    return _Stream({s: w.close() for s, w in writers.items()}, {}, "", None)


def _stage_task(
    data: DataParams, root: str, folder: str, plan, owned: dict, target: str | None, task: int
) -> tuple:
    """One task: its share of the new shards written, and uploaded then removed locally when
    target is an object-store prefix (task 0 also reads every sample). Returns the pass's
    _Stream, the names it uploaded and the source version it read."""
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
        if task == 0:  # the one that reads every sample: the digest and statistics
            stream = _stream(src, data, local, plan, tqdm(disable=True), on_closed, owned)
        else:
            stream = _stream_own(src, data, local, plan, on_closed, owned)
    finally:
        if target is not None:
            for leftover in local.iterdir():
                leftover.unlink()
            os.rmdir(local)
    return stream, uploaded, src.version
