"""Nearest neighbours over written embeddings: the simplest downstream use of the encoder."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.errors import PipelineError
from pipelines.storage import is_remote, location, remote_errors, size

if TYPE_CHECKING:
    from pipelines.registry.models import ModelRegistry

Metric = Literal["euclidean", "cosine"]


@dataclass
class Neighbour:
    key: str
    distance: float
    label: int | None = None


@dataclass
class SimilarResult:
    key: str
    label: int | None
    metric: str
    embeddings: str
    neighbours: list[Neighbour] = field(default_factory=list)
    encoder: str | None = None  # the model version that made the table (its sidecar says)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Embeddings:
    keys: list[str]
    mu: np.ndarray  # (n, latent_dim)
    labels: np.ndarray | None

    def index_of(self, key: str, path: Path) -> int:
        try:
            return self.keys.index(key)
        except ValueError:
            example = f", e.g. {self.keys[0]}" if self.keys else ""
            raise PipelineError(
                f"key {key!r} is not in {path} ({len(self.keys)} embeddings{example})"
            ) from None


_RERUN = "re-run 'vae-pipeline embed' to write it again"
MAX_NEIGHBOURS = 10_000


def _read_table(path: Path) -> pa.Table:
    if is_remote(path):  # a downstream job reading what embed wrote to the object store
        if size(path) is None:
            raise PipelineError(f"no embeddings at {path}; run 'vae-pipeline embed' first")
        with remote_errors(path), path.open("rb") as f:
            return pq.read_table(f)
    if path.is_dir():
        raise PipelineError(f"embeddings file {path} is a folder; {_RERUN}, or pass the file")
    if not path.is_file():
        raise PipelineError(f"no embeddings at {path}; run 'vae-pipeline embed' first")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(
            f"embeddings file {path} is not readable Parquet ({reason}); {_RERUN}"
        ) from exc


def _vectors(table: pa.Table, path: Path) -> np.ndarray:
    """mu as an (n, latent_dim) float array, refusing what embed never writes."""
    col = table["mu"].combine_chunks() if table.num_rows else None
    if col is None:
        return np.zeros((0, 0))
    kind = col.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or
            pa.types.is_fixed_size_list(kind)) or not (
        pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)
    ):  # fmt: skip
        raise PipelineError(
            f"embeddings file {path}: column mu is {kind}, not lists of numbers; {_RERUN}"
        )
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(col)
    if col.null_count or flat.null_count or len(set(lengths.tolist())) != 1 or lengths[0] < 1:
        raise PipelineError(
            f"embeddings file {path}: mu vectors are missing or of different lengths; {_RERUN}"
        )
    mu = flat.to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(col), -1)
    if not np.isfinite(mu).all():
        raise PipelineError(f"embeddings file {path}: mu holds NaN or inf; {_RERUN}")
    return mu


def load_embeddings(path: str | Path) -> Embeddings:
    path = location(path)
    table = _read_table(path)
    if "key" not in table.column_names or "mu" not in table.column_names:
        raise PipelineError(
            f"embeddings file {path} has no key/mu columns, so embed did not write it; {_RERUN}"
        )
    if not pa.types.is_string(table["key"].type) and not pa.types.is_large_string(
        table["key"].type
    ):
        raise PipelineError(
            f"embeddings file {path}: column key is {table['key'].type}, not text; {_RERUN}"
        )
    mu = _vectors(table, path)
    labels = None
    if "label" in table.column_names:
        label = table["label"]
        if not pa.types.is_integer(label.type) or label.null_count:
            raise PipelineError(
                f"embeddings file {path}: column label is {label.type} with "
                f"{label.null_count} missing, not whole numbers; {_RERUN}"
            )
        labels = label.to_numpy()
    return Embeddings(table["key"].to_pylist(), mu, labels)


def nearest(mu: np.ndarray, i: int, k: int, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """Indices and distances of the k rows closest to row i, itself excluded, closest first."""
    if metric == "cosine":
        unit = mu / np.maximum(np.linalg.norm(mu, axis=1, keepdims=True), 1e-12)
        dist = 1.0 - unit @ unit[i]
    else:
        dist = np.linalg.norm(mu - mu[i], axis=1)
    dist[i] = np.inf
    k = min(k, len(mu) - 1)
    idx = np.argpartition(dist, k - 1)[:k] if k > 0 else np.array([], dtype=int)
    idx = idx[np.argsort(dist[idx], kind="stable")]
    return idx, dist[idx]


def similar(
    embeddings: str | Path, key: str, k: int = 10, metric: Metric = "euclidean"
) -> SimilarResult:
    """The k samples whose posterior means are closest to key's."""
    if not 1 <= k <= MAX_NEIGHBOURS:
        raise PipelineError(f"-k must be between 1 and {MAX_NEIGHBOURS}, not {k}")
    if metric not in ("euclidean", "cosine"):
        raise PipelineError(f"metric must be euclidean or cosine, not {metric!r}")
    emb = load_embeddings(embeddings)
    i = emb.index_of(key, location(embeddings))
    idx, dist = nearest(emb.mu, i, k, metric)

    def label(j: int) -> int | None:
        return None if emb.labels is None else int(emb.labels[j])

    return SimilarResult(
        key=key,
        label=label(i),
        metric=metric,
        embeddings=str(embeddings),
        neighbours=[
            # 6 significant digits: float32 means carry no more, and 16 digits read as noise.
            Neighbour(emb.keys[j], float(f"{d:.6g}"), label(j))
            for j, d in zip(idx, dist, strict=True)
        ],
    )


def _sidecar(path: Path) -> dict[str, Any] | None:
    sidecar = location(path).with_suffix(".json")
    try:
        with remote_errors(sidecar):
            doc = json.loads(sidecar.read_text()) if size(sidecar) is not None else None
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def check_follows_champion(
    reg: ModelRegistry, path: str | Path, allow_old: bool = False
) -> str | None:
    """The model version that made the table at path (None if its sidecar is gone); refused in
    one line when it is a version of this project's encoder older than today's champion,
    whose neighbours would silently answer for a model no longer in use."""
    from pipelines import tracking, tracking_checks
    from pipelines.registry.models import CHAMPION, alias_version

    doc = _sidecar(location(path))
    if doc is None:
        return None
    made_by = str(doc.get("model_uri"))
    name, version = reg.model_name("encoder"), str(doc.get("model_version", ""))
    if allow_old or doc.get("model_name") != name or not version.isdigit():
        return made_by
    tracking_checks.check_reachable(reg.store)
    champion = alias_version(tracking.client(reg.store), name, CHAMPION)
    if champion is not None and int(version) < int(champion):
        raise PipelineError(
            f"embeddings {path} were made by {made_by}, older than the champion "
            f"models:/{name}/{champion}; re-run 'vae-pipeline embed' (the retrain flow does on "
            "each promotion), or pass --allow-old-encoder to use them anyway"
        )
    return made_by
