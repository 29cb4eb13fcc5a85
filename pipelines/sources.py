"""Raw data sources, each loaded into one in-memory array with stable sample keys."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.params import DataParams


@dataclass
class SourceData:
    keys: list[str]  # stable, unique per sample; splits and shards are derived from them
    x: np.ndarray  # float32, (N, C, H, W), values in [0, 1]
    labels: np.ndarray | None  # int64 (N,) where the source has labels
    source: str
    version: str  # version of the source (library version, file hash, ...)


def load_digits() -> SourceData:
    """scikit-learn's 8x8 digits (1797 images, shipped with the package: no network)."""
    import sklearn
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    keys = [f"digits-{i:05d}" for i in range(len(x))]
    return SourceData(
        keys, x, bunch.target.astype(np.int64), "digits", f"sklearn-{sklearn.__version__}"
    )


def load_source(params: DataParams) -> SourceData:
    if params.source == "digits":
        data = load_digits()
    else:
        raise NotImplementedError(f"data source {params.source!r}")
    if params.binarize:
        data.x = (data.x >= 0.5).astype(np.float32)
    return data
