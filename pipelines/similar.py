"""Nearest neighbours over written embeddings: the simplest downstream use of the encoder."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.errors import PipelineError

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


def load_embeddings(path: str | Path) -> Embeddings:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"no embeddings at {path}; run 'vae-pipeline embed' first")
    table = pq.read_table(path, columns=None)
    if "key" not in table.column_names or "mu" not in table.column_names:
        raise PipelineError(f"{path} has no key/mu columns; it was not written by embed")
    mu = pc.list_flatten(table["mu"]).to_numpy().astype(np.float64)
    mu = mu.reshape(table.num_rows, -1) if table.num_rows else mu.reshape(0, 0)
    labels = table["label"].to_numpy() if "label" in table.column_names else None
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
    if k < 1:
        raise PipelineError(f"-k must be at least 1, not {k}")
    if metric not in ("euclidean", "cosine"):
        raise PipelineError(f"metric must be euclidean or cosine, not {metric!r}")
    emb = load_embeddings(embeddings)
    i = emb.index_of(key, Path(embeddings))
    idx, dist = nearest(emb.mu, i, k, metric)

    def label(j: int) -> int | None:
        return None if emb.labels is None else int(emb.labels[j])

    return SimilarResult(
        key=key,
        label=label(i),
        metric=metric,
        embeddings=str(embeddings),
        neighbours=[
            Neighbour(emb.keys[j], float(d), label(j)) for j, d in zip(idx, dist, strict=True)
        ],
    )
