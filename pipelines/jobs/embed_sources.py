"""What embed reads: the staged shards of a split (one Ray task per shard, each read and checked
whole) or an array file, as a Ray dataset of keyed images."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.data.shards.format import SPLITS
from pipelines.data.versioning.hashing import file_hash
from pipelines.data.versioning.lineage import dvc_hash, manifest_sha256
from pipelines.errors import PipelineError
from pipelines.paths import Layout
from pipelines.storage import is_remote, location, store_env

_ARRAY_SUFFIXES = (".npy", ".npz")


@dataclass
class EmbedSource:
    make_dataset: Callable[[], Any]  # called once Ray is up
    info: dict[str, Any]  # for the sidecar
    n_samples: int
    shape: tuple[int, ...]
    divide_by: float = 1.0  # stored value / divide_by is the model's input in [0, 1]


def _shard_samples(
    batch: dict[str, np.ndarray], folder: str, entries: dict[str, dict], sample: dict
) -> dict[str, np.ndarray]:
    """Ray Data task: the named shards' samples, each shard read whole by this task and checked
    against the manifest (size, SHA-256, sample count, each sample) as the training loader
    does, so every shard is read once, in parallel across the cluster, and none on the driver."""
    from pipelines.data.shards.loader import read_stored_samples

    shape = tuple(sample["shape"])
    keys, xs, labels, urls = [], [], [], []
    for name in batch["name"]:
        url = f"{folder}/{name}"
        for key, x, label in read_stored_samples(url, entries[name], shape, sample["dtype"]):
            keys.append(key)
            xs.append(x)
            urls.append(url)
            if label is not None:
                labels.append(label)
    out = {"__key__": np.array(keys), "npy": np.stack(xs), "__url__": np.array(urls)}
    if labels:
        out["cls"] = np.array(labels, dtype=np.int64)
    return out


def _shards_source(folder: Path, split: str, concurrency: int) -> EmbedSource:
    from pipelines.data.shards.manifest import read_manifest
    from pipelines.data.shards.reader import verify_shards

    manifest = read_manifest(folder)
    splits = SPLITS if split == "all" else (split,)
    entries = [e for s in splits for e in manifest.shards(s)]
    if not entries:
        raise PipelineError(f"{folder} has no shards for split {split}; re-stage or pick another")
    # Missing or truncated shards fail now, from one listing; the bytes are checked as read.
    verify_shards(folder, splits, skippable=False)
    names = [e.name for e in entries]
    runtime_env = {"env_vars": store_env()} if is_remote(folder) else None  # the store's keys
    kwargs = {
        "folder": str(folder).rstrip("/"),
        "entries": {e.name: e for e in entries},
        "sample": {
            "shape": list(manifest.shape),
            "dtype": manifest.encoding.npy_dtype,
        },
    }

    def make_dataset():
        import ray.data

        # One block per shard, read by the task that decodes it. Those tasks take no CPU slot:
        # the actor pool holds one per actor, and tasks waiting for a free slot behind it hang
        # the job (seen with 2 actors on a 2-CPU Ray).
        return ray.data.from_items(
            [{"name": n} for n in names], override_num_blocks=len(names)
        ).map_batches(
            _shard_samples, fn_kwargs=kwargs, batch_size=1, batch_format="numpy", num_cpus=0,
            compute=ray.data.TaskPoolStrategy(size=concurrency), runtime_env=runtime_env,
        )  # fmt: skip

    return EmbedSource(
        make_dataset,
        {
            "kind": "shards",
            "path": str(folder),
            "split": split,
            "manifest_sha256": manifest_sha256(folder),
        },
        sum(e.samples for e in entries),
        manifest.shape,
        float(manifest.encoding.divide_by),
    )


def _array_source(path: Path, blocks: int) -> EmbedSource:
    from ray.data.extensions import ArrowTensorArray

    from pipelines.data.sources.catalog import load_array

    data = load_array(path)  # checks dtype, shape, NaN/inf and range, with one-line errors
    n = len(data.keys)
    rows = max(1, math.ceil(n / blocks))
    tables = []
    for start in range(0, n, rows):
        cols = {
            "__key__": pa.array(data.keys[start : start + rows], pa.string()),
            "npy": ArrowTensorArray.from_numpy(data.x[start : start + rows]),
        }
        if data.labels is not None:
            cols["cls"] = pa.array(data.labels[start : start + rows], pa.int64())
        tables.append(pa.table(cols))

    def make_dataset():
        import ray.data

        return ray.data.from_arrow(tables)

    info = {"kind": "array", "path": str(path), "sha256": file_hash(path)}
    return EmbedSource(make_dataset, info, n, tuple(data.x.shape[1:]))


def open_source(where: Layout, source: str | None, split: str, concurrency: int) -> EmbedSource:
    """The data to embed: a staged shards folder (Ray reads it) or a .npy/.npz array file
    (read here, then handed to Ray in 4 blocks per actor)."""
    path = location(source or where.shards_setting, where.root)
    if is_remote(path) or path.is_dir():
        src = _shards_source(path, split, concurrency)
        if path == where.shards_dir:  # the folder data.dvc tracks
            src.info["dvc_md5"] = dvc_hash(where.root)
        return src
    if path.suffix in _ARRAY_SUFFIXES:
        if not path.is_file():
            raise PipelineError(f"array file {path} not found")
        if split != "all":  # an array has no splits: every row would be embedded, silently
            raise PipelineError(
                f"--split {split} needs a staged shards folder; the array file {path} has no "
                "splits: drop --split (or set embed.split: all) to embed every row"
            )
        return _array_source(path, blocks=4 * concurrency)
    raise PipelineError(
        f"embed source {path} is neither a staged shards folder nor a .npy/.npz file"
        + ("" if path.exists() else " (it does not exist)")
    )
