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
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipelines import atomic, guards, paths, storage
from pipelines.atomic import remove_leftovers, remove_tree, swap_into_place, temp_dir
from pipelines.data.parallel_staging import stage_workers, stream_on_ray
from pipelines.data.remote_target import Uploader, check_remote_target, no_copy
from pipelines.data.shards.format import (
    CLAIMS_NAME,
    FORMAT,
    MANIFEST,
    SPLITS,
)
from pipelines.data.shards.manifest import (
    Manifest,
    build_manifest,
    written_by_stage,
)
from pipelines.data.shards.numbering import first_free
from pipelines.data.sources.catalog import Source, open_source
from pipelines.data.splitting import (
    check_counts,
    key_splits,
    required_shards,
    shard_count,
    split_counts,
)
from pipelines.data.staging_pass import (
    CONTENT_SCHEME,
    Generation,
    Plan,
    content_digest,
    stream_pass,
    train_stats,
)
from pipelines.data.versioning.lineage import manifest_dvc_md5
from pipelines.params import ClusterParams, DataParams, Params
from pipelines.storage import is_remote, remote_errors

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
    appended: bool = False  # True: the previous shards were kept and new ones added

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
            "appended": self.appended,
            "summary": ", ".join(
                f"{s} {self.samples[s]} samples in {self.shards[s]} shards" for s in SPLITS
            ),
        }


# -- the target folder and what earlier runs left beside it --------------------------------------


@dataclass(frozen=True)
class StageJob:
    """What staging reads, unpacked from params once: the data section, the cluster section
    (the shards every split needs: ranks x loader workers), the folder paths resolve in and
    the shards folder or object-store prefix it writes."""

    data: DataParams
    cluster: ClusterParams
    root: Path
    shards_dir: Path | str
    batch_parts: int = 1  # train.batch_parts: each part reads shards of its own

    @classmethod
    def from_params(cls, params: Params) -> StageJob:
        return cls(
            params.data, params.cluster, params.root, paths.layout(params).shards_dir,
            params.train.parts_on(params.cluster),
        )  # fmt: skip


def stage_shards(job: StageJob, progress: bool = True, rebuild: bool = False) -> StageResult:
    """Stream the configured source into shards + manifest.json (see stage_into)."""
    return stage_into(job, job.shards_dir, progress, rebuild)


def stage_into(job: StageJob, target, progress: bool = True, rebuild: bool = False) -> StageResult:
    """When the source only gained samples since the last staging (same settings), the existing
    shards are kept byte-identical and the new samples go into new shards; rebuild=True re-cuts
    them all. A local folder is swapped in whole; an object-store prefix gets the new shards,
    then the manifest."""
    if is_remote(target):
        return _stage_remote(job, target, progress, rebuild)
    # Before any data is read: the swap at the end replaces target whole.
    guards.check_replaceable_dir(target, job.root, "data.shards_dir", written_by_stage(target))
    guards.check_writable(target.parent if target.exists() else target, "data.shards_dir")
    remove_leftovers(target)
    src, sizes = _opened(job)
    previous = None if rebuild else _previous(target, sizes[1])
    target.parent.mkdir(parents=True, exist_ok=True)
    # Renamed into place when it worked; removed when it did not.
    with temp_dir(target.parent, f".{target.name}.staging", remove_tree) as tmp:
        tmp.chmod(0o755)  # private while written; the renamed folder should not be
        sink = _Sink(_linker(target))
        manifest, appended = _stage_into(tmp, src, job, previous, sizes, progress, sink)
        dvc_md5 = manifest_dvc_md5(tmp)  # tmp holds exactly the manifest and its shards
        swap_into_place(tmp, target)
    return _result(target, src, manifest, dvc_md5, appended)


def _opened(job: StageJob) -> tuple[Source, tuple[np.ndarray, int]]:
    """The source, every sample's split code (splitting.key_splits) and the shards each split
    needs, the counts checked."""
    src = open_source(job.data, job.root)
    need = required_shards(job.data, job.cluster, job.batch_parts)
    codes = key_splits(src, job.data)
    check_counts(split_counts(codes), job.data, need)
    return src, (codes, need)


@dataclass
class _Sink:
    """Where shards go besides tmp: kept ones through keep; new ones numbered past every name in
    taken (and in the previous manifest), each handed to on_closed once written."""

    keep: Callable[[str, Path], None]
    taken: list[str] = field(default_factory=list)
    on_closed: Callable[[Path], None] | None = None


def _stage_into(
    tmp: Path, src: Source, job, previous, sizes, progress, sink: _Sink
) -> tuple[dict, bool]:
    """New shards and manifest.json into tmp (see _Sink); the manifest, and whether samples
    were appended to kept shards."""
    written = _write(src, job, tmp, previous, sizes, progress, sink)
    kept = previous is not None and written is not None
    if written is None:
        log.warning(
            "%s: samples staged before were changed or removed (or data settings changed): "
            "rebuilding every shard",
            job.data.shards_dir,
        )
        for entry in tmp.iterdir():
            entry.unlink()
        written = _write(src, job, tmp, None, sizes, progress, sink)
    splits, stats, content = written
    manifest = build_manifest(src, job.data, splits, stats, content)
    (tmp / MANIFEST).write_text(manifest.to_json())
    return manifest, kept and content["samples"] > previous["content"]["samples"]


def _result(target, src: Source, manifest: Manifest, dvc_md5: str, appended: bool) -> StageResult:
    return StageResult(
        shards_dir=target,
        manifest=target / MANIFEST,
        samples={s: manifest.split_of(s).samples for s in SPLITS},
        shards={s: len(manifest.shards(s)) for s in SPLITS},
        source=src.name,
        version=src.version,
        dvc_md5=dvc_md5,
        shape=tuple(src.shape),
        appended=appended,
    )


def _linker(target: Path):
    def keep(name: str, tmp: Path) -> None:
        """An existing shard into the new folder, unchanged (a hard link where it can be)."""
        try:
            os.link(target / name, tmp / name)
        except OSError:
            shutil.copy2(target / name, tmp / name)

    return keep


def _stage_remote(job: StageJob, target, progress: bool, rebuild: bool) -> StageResult:
    """Stage through a local temporary folder into the prefix: each new shard is uploaded as
    soon as it is written, manifest.json last (readers go by the manifest, so they see the old
    version or the new one), then the shards the new manifest no longer lists are removed. Kept
    shards are never uploaded again, and a new shard never takes the name of an object already
    there: an object store has no rename, so writing over a listed shard would break the old
    version until the manifest is replaced, and for good if the upload stops half-way."""
    where = str(target)
    with remote_errors(where):
        taken = check_remote_target(target)
    src, sizes = _opened(job)
    with remote_errors(where):
        previous = None if rebuild else _previous(target, sizes[1])
    with (
        temp_dir(Path(tempfile.gettempdir()), "vae-pipeline-stage", remove_tree) as tmp,
        Uploader(target, taken, progress) as upload,
    ):
        sink = _Sink(no_copy, upload.taken, upload)
        manifest, appended = _stage_into(tmp, src, job, previous, sizes, progress, sink)
        listed = {e.name for s in SPLITS for e in manifest.shards(s)}
        with remote_errors(where):
            storage.upload(tmp / MANIFEST, target / MANIFEST)
            # Only names staging wrote or claimed: a file that appeared meanwhile stays.
            for name in sorted(set(upload.taken) - listed):
                with contextlib.suppress(FileNotFoundError):
                    (target / name).unlink()
            for obj in list(target.iterdir()):
                if CLAIMS_NAME.fullmatch(obj.name):
                    obj.unlink()
        dvc_md5 = manifest_dvc_md5(target)
    return _result(target, src, manifest, dvc_md5, appended)


def _previous(target: Path, need: int) -> dict | None:
    """The target's manifest, if its shards can be kept: this format, enough shards per split."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    splits = manifest.get("splits") or {}
    if any(
        0 < splits.get(s, {}).get("samples", 0) and len(splits[s]["shards"]) < need for s in SPLITS
    ):
        return None
    content = manifest.get("content")
    if not isinstance(content, dict):
        return None
    if content.get("scheme") != CONTENT_SCHEME:
        log.info("%s was staged by an earlier version: every shard is written once more", target)
        return None
    return manifest


def _write(src: Source, job: StageJob, tmp: Path, previous: dict | None, sizes, progress, sink):
    """The shards (new ones written into tmp, kept ones linked there), the train statistics
    and the content record; None when previous's samples are no longer the source's first
    ones. New shards are numbered past the kept ones and every name in sink.taken."""
    codes, need = sizes
    totals = split_counts(codes)
    sample_bytes = np.dtype(src.dtype).itemsize * math.prod(src.shape) + 128
    if previous is not None:
        earlier = _earlier_generations(src, codes, previous["content"]["generations"])
        if earlier is None:
            return None
        old_n = earlier[-1].stop if earlier else 0
        # The new samples' split counts: what the earlier generations leave of the totals
        # (both dealt from the keys already), not one more pass over the new keys.
        counts = {s: totals[s] - sum(gen.counts[s] for gen in earlier) for s in SPLITS}
        kept = [e["name"] for s in SPLITS for e in previous["splits"][s]["shards"]]
        shards = {s: shard_count(counts[s], sample_bytes, job.data, 1) for s in SPLITS}
        first = first_free([*kept, *sink.taken], shards)
        plan = Plan((*earlier, Generation(old_n, src.n, counts, shards, first, True)), codes)
    else:
        shards = {s: shard_count(totals[s], sample_bytes, job.data, need) for s in SPLITS}
        new = Generation(0, src.n, totals, shards, first_free(sink.taken, shards), True)
        plan = Plan((new,), codes)
    bar = tqdm(total=src.n - plan.generations[0].start, desc="stage", unit="sample",
               file=sys.stderr, disable=not progress)  # fmt: skip
    with bar:
        passed = (
            stream_on_ray(job.data, job.root, job.cluster, src, tmp, plan, sink, bar)
            if stage_workers(job.data) > 1
            else None
        )
        if passed is None:
            passed = stream_pass(src, tmp, plan, bar, sink.on_closed)
    new = plan.new
    new_gen = {"samples": new.stop - new.start, "shards": dict(new.shards)}
    digest = content_digest(src, job.data, plan, passed.digests)
    stats = train_stats(src, plan, passed.stats)
    content = {"samples": src.n, "sha256": digest, "scheme": CONTENT_SCHEME}
    if previous is None:
        return passed.entries, stats, {**content, "generations": [new_gen]}
    earlier_digest = content_digest(src, job.data, plan, passed.digests, len(plan.generations) - 1)
    if earlier_digest != previous["content"]["sha256"]:
        return None
    splits = {}
    for s in SPLITS:
        kept = previous["splits"][s]["shards"]
        for e in kept:
            sink.keep(e["name"], tmp)
        splits[s] = kept + passed.entries[s]
    generations = list(previous["content"]["generations"])
    if new_gen["samples"]:
        generations.append(new_gen)
    return splits, stats, {**content, "generations": generations}


def _earlier_generations(src: Source, codes: np.ndarray, records: list[dict]) -> list | None:
    """The earlier stagings' generations, as their records in the manifest list them (samples
    and shards per split), their split counts from the samples' split codes; None when the
    source now has fewer samples than they hold."""
    out, start = [], 0
    for record in records:
        stop = start + int(record["samples"])
        if stop > src.n:
            return None
        counts = split_counts(codes[start:stop])
        shards = {s: int(record["shards"].get(s, 0)) for s in SPLITS}
        out.append(Generation(start, stop, counts, shards, dict.fromkeys(SPLITS, 0), False))
        start = stop
    return out


def write_record(result: StageResult, path: Path, shards_dir: str) -> None:
    """A machine-independent summary (no absolute paths) for dvc.yaml to track: shards_dir as
    params.yaml gives it (data.shards_dir)."""
    record = result.to_dict()
    record["shards_dir"] = shards_dir
    record.pop("manifest")
    atomic.atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def is_record(path: Path) -> bool:
    """path holds a record write_record wrote (the only kind of file --record replaces)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"dvc_md5", "samples", "shards"} <= record.keys()
