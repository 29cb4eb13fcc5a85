"""Stage a data source as WebDataset tar shards: train/val/test, deterministic to the byte.

Same input and params give byte-identical tars and manifest on any machine, hence the same DVC
hash: the split comes from a SHA-256 of each sample's key (adding samples never moves old ones),
samples are ordered by that hash, and tars carry a fixed mtime, owner and mode. Everything is
written to a temporary folder beside the target and renamed into place at the end, so a failed
run leaves the previous shards untouched and no partial folder behind.

The target is checked first: it must be absent, empty, or hold only what staging writes (shard
tars and our manifest), never the workspace or a folder of the user's. Temporary folders carry
the pid of the run that made them (`.shards.staging-<pid>-xxxx`), so a later run can remove
those of a run that was killed (SIGKILL, power loss) without touching a live one's.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm.auto import tqdm

from pipelines import guards, paths
from pipelines.data.hashing import dvc_dir_md5, file_hash
from pipelines.data.shard_format import FORMAT, MANIFEST, SHARD_NAME, SPLITS, TAR_MTIME
from pipelines.data.sources import SourceData, load_source
from pipelines.errors import PipelineError
from pipelines.params import Params
from vae.io import swap_dir

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    shards_dir: Path
    manifest: Path
    samples: dict[str, int]
    shards: dict[str, int]
    source: str
    version: str  # content digest of the source data
    dvc_md5: str  # what `dvc add` records for the shards folder (`<md5>.dir`)
    shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {
            "shards_dir": str(self.shards_dir),
            "manifest": str(self.manifest),
            "samples": dict(self.samples),
            "shards": dict(self.shards),
            "source": self.source,
            "version": self.version,
            "dvc_md5": self.dvc_md5,
            "shape": list(self.shape),
            "summary": ", ".join(
                f"{s} {self.samples[s]} samples in {self.shards[s]} shards" for s in SPLITS
            ),
        }


# -- splitting ---------------------------------------------------------------------------------


def key_fraction(key: str) -> float:
    """A stable number in [0, 1) per key (SHA-256, unlike hash(), is the same on every run)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    u = key_fraction(key)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def plan_splits(keys: list[str], val_fraction: float, test_fraction: float) -> dict[str, list[int]]:
    """Sample indices per split, ordered by key hash: a fixed order that mixes classes."""
    if val_fraction + test_fraction >= 1:
        raise PipelineError(
            f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction:g} leaves "
            "nothing to train on; keep the sum below 1"
        )
    order = sorted(range(len(keys)), key=lambda i: (key_fraction(keys[i]), keys[i]))
    plan: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i in order:
        plan[split_of(keys[i], val_fraction, test_fraction)].append(i)
    return plan


def required_shards(params: Params) -> int:
    """Shards each split needs: data.min_shards_per_split, and DDP ranks x loader workers."""
    ranks = params.cluster.num_workers
    workers = max(1, params.cluster.loader_workers)
    return max(params.data.min_shards_per_split, ranks * workers)


def shard_capacity(n: int, shard_size: int, min_shards: int) -> int:
    """Samples per shard: at most shard_size, and small enough to cut n into min_shards shards."""
    capacity = max(1, min(shard_size, -(-n // min_shards)))
    # ShardWriter fills shards in order, so ceil(n / capacity) shards come out; shrink until
    # that is enough (5 samples into 4 shards needs capacity 1, not 2).
    while capacity > 1 and -(-n // capacity) < min_shards:
        capacity -= 1
    return capacity


def _check_plan(plan: dict[str, list[int]], params: Params, need: int) -> None:
    d = params.data
    fractions = {"train": 1 - d.val_fraction - d.test_fraction}
    fractions.update(val=d.val_fraction, test=d.test_fraction)
    for split, idx in plan.items():
        if fractions[split] > 0 and len(idx) < need:
            raise PipelineError(
                f"split {split} got {len(idx)} samples, fewer than the {need} shards every split "
                "needs (data.min_shards_per_split, cluster.num_workers x cluster.loader_workers); "
                "add data, change data.val_fraction / data.test_fraction, or lower those settings"
            )


# -- writing -----------------------------------------------------------------------------------


def _npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def _write_split(
    data: SourceData, split: str, idx: list[int], capacity: int, folder: Path, bar: tqdm
) -> list[dict]:
    """Write one split's shards in a fixed order; returns their manifest entries."""
    if not idx:
        return []
    pattern = str(folder).replace("%", "%%") + f"/{split}-%06d.tar"
    with wds.ShardWriter(
        pattern, maxcount=capacity, verbose=0, encoder=False, mtime=TAR_MTIME
    ) as w:
        for i in idx:
            sample = {"__key__": data.keys[i], "npy": _npy_bytes(data.x[i])}
            if data.labels is not None:
                sample["cls"] = str(int(data.labels[i])).encode()
            w.write(sample)
            bar.update(1)
    entries = []
    for n, start in enumerate(range(0, len(idx), capacity)):
        path = folder / f"{split}-{n:06d}.tar"
        entries.append(
            {
                "name": path.name,
                "samples": len(idx[start : start + capacity]),
                "bytes": path.stat().st_size,
                "sha256": file_hash(path),
            }
        )
    return entries


def _normalisation(data: SourceData, train_idx: list[int], binarized: bool) -> dict:
    x = data.x[np.asarray(train_idx, dtype=np.int64)] if train_idx else data.x
    # Rounded so that last-bit differences between CPUs cannot change the manifest bytes.
    mean = [round(float(v), 6) for v in x.mean(axis=(0, 2, 3), dtype=np.float64)]
    std = [round(float(v), 6) for v in x.std(axis=(0, 2, 3), dtype=np.float64)]
    return {
        "range": [0.0, 1.0],
        "scaling": data.scaling,
        "binarized": binarized,
        "train_mean_per_channel": mean,
        "train_std_per_channel": std,
    }


def build_manifest(
    data: SourceData, params: Params, splits: dict[str, list[dict]], norm: dict
) -> dict:
    d = params.data
    return {
        "format": FORMAT,
        "source": {
            "name": data.source,
            "version": data.version,
            # Name only: an absolute path would make the manifest differ between machines.
            "file": Path(d.path).name if d.path and data.source in ("array", "images") else None,
        },
        "sample": {
            "shape": list(data.x.shape[1:]),
            "dtype": "float32",
            "layout": "CHW",
            "fields": {"npy": "image, float32 .npy"}
            | ({"cls": "label, ascii int"} if data.labels is not None else {}),
        },
        "labels": {"present": data.labels is not None, "classes": data.classes},
        "normalisation": norm,
        "split": {
            "method": "sha256(key) as a fraction of 2**64: [0, test) test, [test, test+val) val",
            "val_fraction": d.val_fraction,
            "test_fraction": d.test_fraction,
        },
        "splits": {
            s: {"samples": sum(e["samples"] for e in entries), "shards": entries}
            for s, entries in splits.items()
        },
    }


# -- the target folder and what earlier runs left beside it --------------------------------------


def _manifest_format(path: Path) -> object:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return manifest.get("format") if isinstance(manifest, dict) else None


def written_by_stage(entry: Path) -> bool:
    """Whether entry of a shards folder is one staging writes: a shard or our manifest."""
    if not entry.is_file():
        return False
    if SHARD_NAME.fullmatch(entry.name):
        return True
    return entry.name == MANIFEST and _manifest_format(entry) == FORMAT


def _temp_dir(target: Path, kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{os.getpid()}-", dir=target.parent))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:  # another user's live process
        return True
    return pid > 0


def remove_leftovers(target: Path) -> list[Path]:
    """Remove the temporary folders that killed stage runs left beside target (those of live
    runs stay). A killed swap may have left the only copy of the previous shards in its `.old`
    folder with no target: that copy is put back first."""
    pattern = re.compile(
        re.escape(f".{target.name}.") + r"(?P<kind>staging|old)-(?:(?P<pid>\d+)-)?[a-z0-9_]+"
    )
    if not target.parent.is_dir():
        return []
    removed = []
    for entry in sorted(target.parent.iterdir()):
        m = pattern.fullmatch(entry.name)
        if m is None or entry.is_symlink() or not entry.is_dir():
            continue
        if m["pid"] is not None and _pid_alive(int(m["pid"])):
            continue
        kept = entry / target.name
        if m["kind"] == "old" and kept.is_dir() and not (target.exists() or target.is_symlink()):
            os.replace(kept, target)
            log.warning("put back %s from %s, left by a stage run that was killed", target, entry)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _swap_into_place(tmp: Path, target: Path) -> None:
    """swap_dir, with the old shards aside in a pid-named folder that remove_leftovers knows
    (and puts back if this process is killed mid-swap)."""
    old = _temp_dir(target, "old")
    try:
        swap_dir(tmp, target, aside=old / target.name)
    finally:
        with contextlib.suppress(OSError):
            old.rmdir()


def stage_shards(params: Params, progress: bool = True) -> StageResult:
    """Load the configured source, check it, and write its shards + manifest.json atomically."""
    d = params.data
    target = paths.shards_dir(params)
    # Before any data is loaded: the swap at the end replaces target whole.
    guards.check_replaceable_dir(target, params.root, "data.shards_dir", written_by_stage)
    guards.check_writable(target.parent if target.exists() else target, "data.shards_dir")
    remove_leftovers(target)
    data = load_source(d, params.root)
    plan = plan_splits(data.keys, d.val_fraction, d.test_fraction)
    need = required_shards(params)
    _check_plan(plan, params, need)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_dir(target, "staging")
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the renamed folder should not be
        bar = tqdm(
            total=len(data.keys), desc="stage", unit="sample", file=sys.stderr, disable=not progress
        )
        with bar:
            splits = {
                s: _write_split(
                    data, s, plan[s], shard_capacity(len(plan[s]), d.shard_size, need), tmp, bar
                )
                for s in SPLITS
            }
        manifest = build_manifest(
            data, params, splits, _normalisation(data, plan["train"], d.binarize)
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        dvc_md5 = dvc_dir_md5(tmp)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return StageResult(
        shards_dir=target,
        manifest=target / MANIFEST,
        samples={s: len(plan[s]) for s in SPLITS},
        shards={s: len(splits[s]) for s in SPLITS},
        source=data.source,
        version=data.version,
        dvc_md5=dvc_md5,
        shape=tuple(data.x.shape[1:]),
    )


def write_record(result: StageResult, path: Path, params: Params) -> None:
    """A machine-independent summary (no absolute paths) for dvc.yaml to track."""
    record = result.to_dict()
    record["shards_dir"] = params.data.shards_dir
    record.pop("manifest")
    guards.atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def is_record(path: Path) -> bool:
    """path holds a record write_record wrote (the only kind of file --record replaces)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"dvc_md5", "samples", "shards"} <= record.keys()
