"""Raw data sources, each loaded into one in-memory array with stable sample keys.

Sources: scikit-learn's digits (embedded, no network), MNIST and Fashion-MNIST (IDX files,
downloaded once), a `.npy`/`.npz` array file, and a folder of PNG/JPEG images. Every source ends
as float32 (N, C, H, W) in [0, 1]; `check_source` rejects anything else with a one-line error
naming the sample or file.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.errors import PipelineError
from pipelines.params import DataParams


@dataclass
class SourceData:
    keys: list[str]  # stable, unique per sample; splits and shards are derived from them
    x: np.ndarray  # float32, (N, C, H, W), values in [0, 1]
    labels: np.ndarray | None  # int64 (N,) where the source has labels
    source: str
    version: str  # content digest of the raw data: changes exactly when the data changes
    classes: list[str] | None = None  # label names, where the source has them
    scaling: str = "none"  # how raw values were mapped to [0, 1], e.g. "x/255"


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.dtype).encode() + str(a.shape).encode() + np.ascontiguousarray(a).tobytes())
    return "sha256:" + h.hexdigest()[:16]


def load_digits() -> SourceData:
    """scikit-learn's 8x8 digits (1797 images, shipped with the package: no network)."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    keys = [f"digits-{i:05d}" for i in range(len(x))]
    labels = bunch.target.astype(np.int64)
    classes = [str(i) for i in range(10)]
    return SourceData(keys, x, labels, "digits", _digest(bunch.data, bunch.target), classes, "x/16")


def load_mnist(source: str, cache_dir: Path, base_url: str | None = None) -> SourceData:
    """MNIST or Fashion-MNIST, official train and test parts together (keys say which)."""
    from pipelines.idx import CLASSES, load_idx_dataset

    arrays, version = load_idx_dataset(source, cache_dir / source, base_url)
    keys, xs, ys = [], [], []
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        keys += [f"{source}-{part}-{i:05d}" for i in range(len(images))]
        xs.append(images)
        ys.append(labels)
    x = (np.concatenate(xs)[:, None].astype(np.float32)) / 255.0
    labels = np.concatenate(ys).astype(np.int64)
    return SourceData(keys, x, labels, source, version, CLASSES[source], "x/255")


def _read_array_file(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if not path.is_file():
        raise PipelineError(f"array file {path} not found; set data.path to a .npy or .npz file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise PipelineError(
                f"{path} holds Python objects (dtype object); save a numeric array instead"
            ) from exc
        raise PipelineError(f"cannot read {path} as .npy/.npz ({exc}); re-save it") from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise PipelineError(f"cannot read {path} as .npy/.npz ({exc}); re-save it") from exc
    if isinstance(loaded, np.ndarray):
        return loaded, None
    with loaded:
        names = list(loaded.files)
        if "x" in names:
            x_name = "x"
        elif len(names) == 1:
            x_name = names[0]
        else:
            raise PipelineError(
                f"{path} holds arrays {names}; name the images 'x' (and labels 'y')"
            )
        label_name = next((n for n in ("y", "labels") if n in names), None)
        try:
            x = loaded[x_name]
            y = loaded[label_name] if label_name else None
        except ValueError as exc:
            raise PipelineError(
                f"{path} holds Python objects (dtype object); save numeric arrays instead"
            ) from exc
    return x, y


def _to_nchw(x: np.ndarray, path: Path) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return x
    if x.ndim == 4 and x.shape[-1] in (1, 3):
        return x.transpose(0, 3, 1, 2)
    raise PipelineError(
        f"{path} has shape {x.shape}; need (N, H, W), (N, C, H, W) or (N, H, W, C) with C 1 or 3"
    )


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))[0])


def load_array(path: Path) -> SourceData:
    """A .npy array or .npz with 'x' (and optional 'y' labels); keys are row numbers.

    uint8/integer images are divided by 255, floats must already be in [0, 1]. Keys follow row
    order, so append new rows at the end to keep old samples in their splits.
    """
    raw, labels = _read_array_file(path)
    if raw.dtype.kind not in "biuf":
        raise PipelineError(
            f"{path} has dtype {raw.dtype}; need numbers (uint8 0..255 or floats in [0, 1])"
        )
    if raw.size == 0 or len(raw) == 0:
        raise PipelineError(f"{path} holds no samples (shape {raw.shape}); add data to it")
    x = _to_nchw(raw, path)
    keys = [f"array-{i:07d}" for i in range(len(x))]
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.ndim != 1 or len(labels) != len(x):
            raise PipelineError(
                f"{path}: labels have shape {labels.shape} dtype {labels.dtype} but there are "
                f"{len(x)} samples; need one integer label per sample"
            )
        labels = labels.astype(np.int64)
    if x.dtype.kind in "iu":
        out = (x < 0) | (x > 255)
        if out.any():
            i = _first_bad(out)
            raise PipelineError(
                f"sample {keys[i]} (row {i} of {path}) has integer values outside 0..255; "
                "save uint8 images or floats in [0, 1]"
            )
        x, scaling = x.astype(np.float32) / 255.0, "x/255"
    else:
        # Check before the float32 cast, which would turn huge float64 values into inf.
        check_range(keys, x, where=str(path))
        x, scaling = x.astype(np.float32), "none"
    return SourceData(keys, x, labels, "array", _file_digest(path), None, scaling)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()[:16]


def load_images(folder: Path, size: tuple[int, int], grayscale: bool) -> SourceData:
    from pipelines.images import load_image_folder

    keys, x, labels, classes, version = load_image_folder(folder, tuple(size), grayscale)
    return SourceData(keys, x, labels, "images", version, classes, "x/255")


def check_range(keys: list[str], x: np.ndarray, where: str) -> None:
    """Every value finite and in [0, 1]; the error names the first sample that is not."""
    bad = ~np.isfinite(x)
    if bad.any():
        i = _first_bad(bad)
        what = "NaN" if np.isnan(x[i]).any() else "inf"
        raise PipelineError(f"sample {keys[i]} from {where} contains {what}; clean or drop it")
    out = (x < 0) | (x > 1)
    if out.any():
        i = _first_bad(out)
        lo, hi = float(x[i].min()), float(x[i].max())
        raise PipelineError(
            f"sample {keys[i]} from {where} has values in [{lo:g}, {hi:g}]; the pipeline needs "
            "[0, 1]: rescale (e.g. (x - min) / (max - min)) or save uint8"
        )


def check_source(data: SourceData) -> None:
    """What staging relies on: non-empty float32 (N, C, H, W) in [0, 1], unique keys, labels."""
    where = f"source {data.source}"
    if len(data.keys) == 0 or data.x.size == 0:
        raise PipelineError(f"{where} holds no samples; point data.path at non-empty data")
    if data.x.dtype != np.float32 or data.x.ndim != 4 or data.x.shape[1] not in (1, 3):
        raise PipelineError(
            f"{where} gave {data.x.dtype} {data.x.shape}; need float32 (N, C, H, W) with C 1 or 3"
        )
    if len(data.keys) != len(data.x) or len(set(data.keys)) != len(data.keys):
        raise PipelineError(f"{where} gave {len(data.keys)} keys for {len(data.x)} samples")
    if data.labels is not None and data.labels.shape != (len(data.x),):
        raise PipelineError(
            f"{where} gave labels of shape {data.labels.shape} for {len(data.x)} samples"
        )
    check_range(data.keys, data.x, where)


def load_source(params: DataParams, root: Path | None = None) -> SourceData:
    """Load and check the configured source; relative paths are resolved against root (or cwd)."""
    root = Path.cwd() if root is None else Path(root)

    def resolve(p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else root / path

    if params.source == "digits":
        data = load_digits()
    elif params.source in ("mnist", "fashion_mnist"):
        data = load_mnist(params.source, resolve(params.cache_dir), params.download_url)
    elif params.path is None:
        what = "a .npy/.npz file" if params.source == "array" else "a folder of PNG/JPEG images"
        raise PipelineError(f"data.source {params.source} needs data.path ({what})")
    elif params.source == "array":
        data = load_array(resolve(params.path))
    else:
        data = load_images(resolve(params.path), params.image_size, params.grayscale)
    check_source(data)
    if params.binarize:
        data.x = (data.x >= 0.5).astype(np.float32)
    return data
