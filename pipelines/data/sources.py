"""Raw data sources, each loaded into one in-memory array with stable sample keys.

Sources: scikit-learn's digits (embedded, no network), MNIST and Fashion-MNIST (IDX files,
downloaded once), a `.npy`/`.npz` array file, and a folder of PNG/JPEG images. Every source ends
as float32 (N, C, H, W) in [0, 1]; `check_source` rejects anything else with a one-line error
naming the sample or file.
"""

from __future__ import annotations

import hashlib
import math
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from pipelines.data.hashing import file_hash
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
    from pipelines.data.idx import CLASSES, load_idx_dataset

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


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip
_SAVE_HINT = "save images with np.save, or np.savez(path, x=images, y=labels)"


def _check_array_path(path: Path) -> str:
    """'npy' or 'npz', from the file's first bytes; anything else raises."""
    if path.is_dir():
        raise PipelineError(
            f"data.path {path} is a folder; data.source array needs a .npy or .npz file "
            "(data.source images reads folders of PNG/JPEG)"
        )
    if not path.is_file():
        raise PipelineError(f"array file {path} not found; set data.path to a .npy or .npz file")
    if path.suffix.lower() not in (".npy", ".npz"):
        raise PipelineError(
            f"{path} is a {path.suffix or 'suffix-less'} file; data.source array reads .npy or "
            f".npz files: {_SAVE_HINT}"
        )
    with path.open("rb") as f:
        head = f.read(len(_NPY_MAGIC))
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if head[:4] in _ZIP_MAGIC:
        return "npz"
    raise PipelineError(
        f"{path} is not a NumPy .npy/.npz file (it does not start with their signature); "
        f"{_SAVE_HINT}"
    )


def _check_npy_header(f: IO[bytes], size: int, where: str) -> None:
    """Refuse, from the header alone, arrays of Python objects and files shorter than their
    header says: np.load would unpickle the one and allocate the whole claimed size for the
    other before noticing."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(f)
        else:
            return  # 3.0 (UTF-8 field names): np.load checks it, and MemoryError is caught
    except (ValueError, EOFError, OSError) as exc:
        raise PipelineError(
            f"{where} has a damaged .npy header ({str(exc).splitlines()[0]}); {_SAVE_HINT}"
        ) from exc
    if dtype.hasobject:
        raise PipelineError(
            f"{where} holds Python objects (dtype {dtype}); save numeric images instead "
            "(uint8 0..255 or floats in [0, 1])"
        )
    need = math.prod(shape) * dtype.itemsize
    have = size - f.tell()
    if have < need:
        raise PipelineError(
            f"{where} is truncated: its header says shape {tuple(shape)} {dtype} ({need} bytes) "
            f"but it holds {have}; re-save it"
        )


def _choose_npz_arrays(names: list[str], path: Path) -> tuple[str, str | None]:
    """The member holding the images ('x', or the only one) and the labels ('y' or 'labels')."""
    if "x" in names:
        x_name = "x"
    elif len(names) == 1:
        x_name = names[0]
    else:
        raise PipelineError(f"{path} holds arrays {names} but none named 'x'; {_SAVE_HINT}")
    return x_name, next((n for n in ("y", "labels") if n in names and n != x_name), None)


def _check_npz(path: Path) -> tuple[str, str | None]:
    try:
        with zipfile.ZipFile(path) as z:
            members = {n.removesuffix(".npy"): n for n in z.namelist()}
            if not members:
                raise PipelineError(f"{path} holds no arrays; {_SAVE_HINT}")
            x_name, y_name = _choose_npz_arrays(list(members), path)
            for name in (x_name, y_name):
                if name is not None:
                    info = z.getinfo(members[name])
                    with z.open(info) as f:
                        _check_npy_header(f, info.file_size, f"array {name!r} of {path}")
    # RuntimeError: an encrypted member; NotImplementedError: an unknown compression.
    except (
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        OSError,
        RuntimeError,
        NotImplementedError,
    ) as exc:
        raise PipelineError(f"{path} is a damaged .npz file ({exc}); re-save it") from exc
    return x_name, y_name


def _loaded(load: Callable[[], np.ndarray], where: str) -> np.ndarray:
    try:
        return load()
    except MemoryError as exc:
        raise PipelineError(
            f"{where} does not fit in memory ({exc}); stage a smaller array or use a machine "
            "with more memory"
        ) from exc
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(f"cannot read {where} ({reason}); re-save it: {_SAVE_HINT}") from exc


def _read_array_file(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The images and labels (or None) of a .npy/.npz file, never unpickling anything."""
    if _check_array_path(path) == "npy":
        with path.open("rb") as f:
            _check_npy_header(f, path.stat().st_size, str(path))
        return _loaded(lambda: np.load(path, allow_pickle=False), str(path)), None
    x_name, y_name = _check_npz(path)
    with np.load(path, allow_pickle=False) as loaded:
        x = _loaded(lambda: loaded[x_name], f"array {x_name!r} of {path}")
        y = (
            None
            if y_name is None
            else _loaded(lambda: loaded[y_name], f"array {y_name!r} of {path}")
        )
    return x, y


def _to_nchw(x: np.ndarray, path: Path) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return x
    if x.ndim == 4 and x.shape[-1] in (1, 3):
        return x.transpose(0, 3, 1, 2)
    alpha = (
        " (drop the alpha channel of RGBA: x[..., :3])"
        if x.ndim == 4 and 4 in (x.shape[1], x.shape[-1])
        else ""
    )
    raise PipelineError(
        f"{path} has shape {x.shape}; need (N, H, W), (N, C, H, W) or (N, H, W, C) with C 1 "
        f"or 3{alpha}"
    )


def _check_labels(labels: np.ndarray, n: int, path: Path) -> np.ndarray:
    """One integer label per sample, as int64 (uint64 values past int64 would wrap)."""
    fits = labels.dtype.kind in "iu" and labels.ndim == 1 and len(labels) == n
    if fits and labels.dtype.kind == "u" and len(labels):
        fits = int(labels.max()) <= np.iinfo(np.int64).max
    if not fits:
        raise PipelineError(
            f"{path}: labels have shape {labels.shape} dtype {labels.dtype} for {n} samples; "
            f"need one integer label per sample (y of shape ({n},), int64)"
        )
    return labels.astype(np.int64)


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
    x = _to_nchw(raw, path)  # first: a 0-d array has no length
    if x.size == 0:
        raise PipelineError(f"{path} holds no samples (shape {raw.shape}); add data to it")
    keys = [f"array-{i:07d}" for i in range(len(x))]
    if labels is not None:
        labels = _check_labels(labels, len(x), path)
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
    return "sha256:" + file_hash(path)[:16]


def load_images(folder: Path, size: tuple[int, int], grayscale: bool) -> SourceData:
    from pipelines.data.images import load_image_folder

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
