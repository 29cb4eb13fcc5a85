"""The `embed` job: a registered encoder's posterior means for a shards folder or an array file,
computed with Ray Data, written to Parquet (a local file or an object-store URL) with the sample
keys and a JSON sidecar.

Ray Data reads the shards in parallel tasks and runs the encoder in a pool of actors that each
load the model once, with `mlflow.pytorch.load_model`: the registered pt2 program is the only
model code that runs. It travels to the actors as the MLflow model's files, so on a cluster
only the shards need shared storage (as cluster.storage_path does) and the workers need this
package installed.
Output rows keep the input order (shard order, then sample order), so the same model and data
give the same file.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from pipelines import atomic, guards
from pipelines.cluster import native_stderr_hidden, task_error_line
from pipelines.data.shards.format import SPLITS
from pipelines.errors import PipelineError
from pipelines.jobs.embed_sources import EmbedSource, open_source
from pipelines.params import ClusterParams, EmbedParams, Params
from pipelines.paths import Layout, layout
from pipelines.registry import models as registry
from pipelines.storage import is_remote, location, remote_errors
from pipelines.storage import size as storage_size

# In the schema metadata of every Parquet file embed writes: how embed tells its own earlier
# output (which it may overwrite) from a file a person put there.
PARQUET_MARK = {b"vae-pipeline": b"embed"}


@dataclass
class EmbedResult:
    output: str
    sidecar: str
    model_uri: str  # the resolved version, models:/<name>-encoder/<version>
    requested: str  # what was asked for, e.g. models:/<name>-encoder@champion
    n_samples: int
    latent_dim: int
    include_logvar: bool
    data: dict[str, Any]
    columns: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- sources -----------------------------------------------------------------------------------


# -- inference ---------------------------------------------------------------------------------


class EncoderActor:
    """One model per Ray actor, loaded once (its MLflow files, unpickled: RegisteredModel);
    a batch of samples -> embeddings."""

    def __init__(
        self, model: registry.RegisteredModel, include_logvar: bool, threads: int, divide_by: float
    ) -> None:
        torch.set_num_threads(max(1, threads))  # one actor per CPU, not every core each
        self.model = model
        self.include_logvar = include_logvar
        self.scale = np.float32(1.0 / divide_by)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = batch["npy"]
        x = np.stack(list(x)) if x.dtype == object else x
        # A copy: Ray hands read-only arrays, which torch.from_numpy warns about.
        mu, logvar = self.model.embed(torch.from_numpy(np.array(x, dtype=np.float32) * self.scale))
        out = {"key": np.asarray(batch["__key__"]).astype(str), "mu": mu.numpy()}
        if "__url__" in batch:
            out["split"] = np.array([Path(u).name.split("-")[0] for u in batch["__url__"]])
        if "cls" in batch:
            out["label"] = np.asarray(batch["cls"]).astype(np.int64)
        if self.include_logvar:
            out["logvar"] = logvar.numpy()
        return out


def _vectors(a: np.ndarray) -> pa.Array:
    """(n, L) floats -> list<float> column."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    n, dim = a.shape
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(a.reshape(-1)))


def _to_table(batch: dict[str, np.ndarray]) -> pa.Table:
    cols: dict[str, pa.Array] = {"key": pa.array(batch["key"].tolist(), pa.string())}
    if "split" in batch:
        cols["split"] = pa.array(batch["split"].tolist(), pa.string())
    if "label" in batch:
        cols["label"] = pa.array(batch["label"], pa.int64())
    cols["mu"] = _vectors(batch["mu"])
    if "logvar" in batch:
        cols["logvar"] = _vectors(batch["logvar"])
    return pa.table(cols)


@contextmanager
def _ray_data_settings(progress: bool) -> Iterator[None]:
    """Keep input order (reproducible files); our bar replaces Ray's, which are noisy."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (
        ctx.execution_options.preserve_order, ctx.enable_progress_bars,
        ctx.raise_original_map_exception,
    )  # fmt: skip
    logger = logging.getLogger("ray.data")
    level = logger.level
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    # A bad shard's PipelineError reaches us as itself (Ray Data's UserCodeException wrapper
    # keeps only its text), so the user reads our one line, not "this is a bug".
    ctx.raise_original_map_exception = True
    logger.setLevel(logging.ERROR)  # "Progress bars disabled" is a WARNING, and ours shows
    try:
        with native_stderr_hidden():
            yield
    finally:
        (
            ctx.execution_options.preserve_order, ctx.enable_progress_bars,
            ctx.raise_original_map_exception,
        ) = saved  # fmt: skip
        logger.setLevel(level)


def _write(dataset, path: Path, n_total: int, progress: bool) -> tuple[int, list[str]]:
    """Stream the result into one Parquet file (tmp then rename: never a half-written file)."""
    n, columns = 0, []
    bar = tqdm(total=n_total, desc="embed", unit="sample", disable=not progress)
    try:
        with atomic.atomic_path(path) as tmp:
            writer = None
            try:
                for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    table = _to_table(batch).replace_schema_metadata(PARQUET_MARK)
                    writer = writer or pq.ParquetWriter(tmp, table.schema)
                    writer.write_table(table)
                    n += table.num_rows
                    bar.update(table.num_rows)
                if writer is None:
                    raise PipelineError("the embed source has no samples")
                columns = list(writer.schema.names)
            finally:
                if writer is not None:
                    writer.close()
    finally:
        bar.close()
    return n, columns


def write_embeddings(
    src: EmbedSource,
    model: registry.RegisteredModel,
    out: Path,
    include_logvar: bool,
    ep: EmbedParams,
    progress: bool = True,
) -> tuple[int, list[str]]:
    """Run the registered encoder over src on the current Ray's actors; write out."""
    import ray.data

    with _ray_data_settings(progress):
        dataset = src.make_dataset().map_batches(
            EncoderActor,
            fn_constructor_kwargs={
                # Ray Data 2.60 logs "Actor ... has constructor arguments in the object store"
                # for every actor pool, large arguments or not (ray-project/ray#57733).
                "model": model,
                "include_logvar": include_logvar,
                "threads": int(ep.cpus_per_actor),
                "divide_by": src.divide_by,
            },
            batch_size=ep.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=ep.concurrency),
            num_cpus=ep.cpus_per_actor,
        )
        try:
            if not is_remote(out):
                return _write(dataset, out, src.n_samples, progress)
            # Written here, then one PUT: readers of the store never see half a file.
            with tempfile.TemporaryDirectory(prefix="vae-embed-") as tmp:
                local = Path(tmp) / out.name
                written = _write(dataset, local, src.n_samples, progress)
                with remote_errors(out):
                    out.fs.put_file(str(local), out.path)
                return written
        except Exception as exc:
            err = task_error_line(exc, "embedding failed: ")
            if err is None:  # not ours, or raised here (not in a Ray task)
                raise
            raise err from exc


# -- the job -----------------------------------------------------------------------------------


def _sidecar_is_ours(path: Path) -> bool:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return (
        isinstance(doc, dict)
        and str(doc.get("model_uri", "")).startswith("models:/")
        and isinstance(doc.get("columns"), list)
        and isinstance(doc.get("data"), dict)
    )


def is_ours(path: Path) -> bool:
    """path is a Parquet file embed wrote: it carries PARQUET_MARK or, written before the mark
    existed, it has embed's key/mu columns and embed's sidecar beside it."""
    try:
        if is_remote(path):
            with path.open("rb") as f:
                schema = pq.read_schema(f)
        else:
            schema = pq.read_schema(path)
    except Exception:  # unreadable or not Parquet: not ours, whatever the reason
        return False
    meta = schema.metadata or {}
    if all(meta.get(k) == v for k, v in PARQUET_MARK.items()):
        return True
    return {"key", "mu"} <= set(schema.names) and _sidecar_is_ours(path.with_suffix(".json"))


def check_output(out: Path) -> None:
    """The Parquet file and its sidecar may be written: of the right kind, not folders, in a
    writable folder, and replacing nothing embed did not write."""
    if is_remote(out):
        _check_remote_output(out)
        return
    guards.check_output_file(out, "--out (embed.output)", (".parquet",), is_ours)
    sidecar = out.with_suffix(".json")
    guards.check_output_file(sidecar, f"--out's sidecar {sidecar.name}", (), _sidecar_is_ours)


def _check_remote_output(out: Path) -> None:
    """An object-store output: the same rules, asked of the store (it has no folders to be
    in the way, and whether a key may be written shows only when it is)."""
    if out.suffix.lower() != ".parquet":
        raise PipelineError(f"--out (embed.output): {out} must end in .parquet; choose such a name")
    for path, ours in ((out, is_ours), (out.with_suffix(".json"), _sidecar_is_ours)):
        with remote_errors(path):
            if storage_size(path) is not None and not ours(path):
                raise PipelineError(
                    f"--out (embed.output): {path} exists and was not written by vae-pipeline; "
                    "remove it or choose another key"
                )


def check_lineage(
    allow_other_data: bool, src: EmbedSource, version: registry.RegisteredVersion
) -> None:
    """Shards of another data version than the encoder's are refused unless asked for
    (embed.allow_other_data): the embeddings would otherwise be filed as the model's data."""
    if src.info["kind"] != "shards" or allow_other_data:
        return
    trained = version.tags.get("data.manifest_sha256")
    have = src.info["manifest_sha256"]
    if trained == have:
        return
    what = (
        f"was trained on data version {trained[:12]}"
        if trained and trained != "None"
        else "records no data version"
    )
    raise PipelineError(
        f"{version.uri} {what} but {src.info['path']} holds {have[:12]}; embed the shards it "
        "was trained on ('dvc checkout'), retrain and register on these, or set "
        "embed.allow_other_data=true to embed them anyway"
    )


@dataclass(frozen=True)
class EmbedJob:
    """What embed reads, unpacked from params once (at the CLI and the flow): its own section,
    where files are (outputs, shards, embed.output), the registry and the cluster."""

    ep: EmbedParams
    where: Layout
    registry: registry.ModelRegistry
    cluster: ClusterParams

    @classmethod
    def from_params(cls, params: Params) -> EmbedJob:
        return cls(params.embed, layout(params), registry.registry_of(params), params.cluster)


def embed(
    job: EmbedJob,
    model_uri: str | None = None,
    source: str | None = None,
    output: str | None = None,
    include_logvar: bool | None = None,
    split: str | None = None,
    progress: bool = True,
) -> EmbedResult:
    """Embed a shards folder or array file with a registered encoder (default: embed.model,
    the champion), loaded through MLflow."""
    from pipelines.cluster import check_fits_a_node, ensure_ray, signals_kept_through_ray

    ep, where, cluster = job.ep, job.where, job.cluster

    include_logvar = ep.include_logvar if include_logvar is None else include_logvar
    split = split or ep.split
    if split not in ("all", *SPLITS):
        raise PipelineError(f"split must be all, train, val or test, not {split!r}")
    out = where.embeddings_path(output)
    check_output(out)  # before the model is pulled or Ray starts
    src = open_source(where, source, split, ep.concurrency)
    model, version = registry.load_registered(job.registry, "encoder", model_uri or ep.model)
    _check_fits(model, version, src, include_logvar)
    check_lineage(ep.allow_other_data, src, version)
    check_fits_a_node(cluster, ep.cpus_per_actor, "embed.cpus_per_actor")
    ensure_ray(cluster)
    with signals_kept_through_ray():  # SIGTERM stays SIGTERM through Ray's blocking calls
        n, columns = write_embeddings(src, model, out, include_logvar, ep, progress)
    result = EmbedResult(
        output=str(out),
        sidecar=str(out.with_suffix(".json")),  # an s3:// URL stays one
        model_uri=version.uri,
        requested=version.requested,
        n_samples=n,
        latent_dim=model.config.latent_dim,
        include_logvar=include_logvar,
        data=src.info,
        columns=columns,
    )
    _write_sidecar(result, version)
    return result


def _check_fits(
    model: registry.RegisteredModel,
    version: registry.RegisteredVersion,
    src: EmbedSource,
    include_logvar: bool,
) -> None:
    """The encoder can embed src as asked: the same sample shape, a log-variance if wanted."""
    if include_logvar and not model.config.variational:
        raise PipelineError(
            f"{version.uri} is a deterministic {model.config.kind}: it has no log-variance; "
            "drop --logvar"
        )
    if src.shape != model.config.input_shape:
        raise PipelineError(
            f"{src.info['path']} holds samples of shape {src.shape} but {version.uri} expects "
            f"{model.config.input_shape}; embed data like the model's training data"
        )


def _write_sidecar(result: EmbedResult, version: registry.RegisteredVersion) -> None:
    sidecar = {
        "model_uri": result.model_uri,
        "requested": result.requested,
        "model_name": version.name,
        "model_version": version.version,
        "run_id": version.run_id,
        "data_version_trained_on": version.tags.get("data.manifest_sha256"),
        "data": result.data,
        "n_samples": result.n_samples,
        "latent_dim": result.latent_dim,
        # mu and logvar: list<float> of latent_dim each; split: shards only; label: if any.
        "columns": result.columns,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    text = json.dumps(sidecar, indent=2) + "\n"
    path = location(result.sidecar)
    if not is_remote(path):
        atomic.atomic_write_text(path, text)
        return
    with remote_errors(path):
        path.write_text(text)
