"""Raw data sources, read in chunks with stable sample keys, in their native type.

Sources: scikit-learn's digits (embedded, no network), MNIST and Fashion-MNIST (IDX files,
downloaded once), a `.npy`/`.npz` array file, a folder of PNG/JPEG images, and procedural sprites.
A `Source` knows its size, shape and native type up front and yields chunks of a few thousand
samples, so staging holds one chunk at a time whatever the dataset's size: uint8 images stay
uint8 (scaled to [0, 1] by the loader), float arrays stay float32. Every chunk is checked as it
is read, with a one-line error naming the sample or file. `load_source` materialises a whole
source as float32 in [0, 1] for the in-memory paths (quickstart, embedding an array file).
"""

from __future__ import annotations

import hashlib
import math
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np

from pipelines.data.sources.base import CHUNK, Chunk, Source, SourceData
from pipelines.data.versioning.hashing import file_hash
from pipelines.errors import PipelineError
from pipelines.params import DataParams

__all__ = ["CHUNK", "Chunk", "Source", "SourceData"]  # what readers of sources.py import


def open_sprites(size: int | None) -> Source:
    """Procedural dSprites-like 64x64 shapes (square, ellipse, heart) over scale, rotation and
    x/y position, with those factors recorded per sample; labels are the shape. Any size up to
    the full grid, byte-deterministic; a larger size keeps the smaller one's samples first."""
    from pipelines.data.sources import sprites

    n = sprites.GRID_SIZE if size is None else size
    indices = sprites.sample_indices(n)

    def keys(a: int, b: int) -> list[str]:
        return [sprites.sample_key(i) for i in indices[a:b]]

    def read(a: int, b: int) -> Chunk:
        factors = sprites.factors_of(indices[a:b])
        x = sprites.render(indices[a:b])[:, None]
        return Chunk(a, keys(a, b), x, factors[:, 0].astype(np.int64), factors)

    spec = {"names": list(sprites.FACTOR_NAMES), "sizes": list(sprites.FACTOR_SIZES)}
    version = _digest(indices, np.asarray(sprites.FACTOR_SIZES))
    return Source(
        "sprites", n, (1, sprites.SIDE, sprites.SIDE), "uint8", 255.0, "x/255", version, read,
        keys, list(sprites.SHAPES), True, None, spec,
    )  # fmt: skip


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.dtype).encode() + str(a.shape).encode() + np.ascontiguousarray(a).tobytes())
    return "sha256:" + h.hexdigest()[:16]


def _in_memory(name, keys, x, labels, version, classes, divide_by, scaling) -> Source:  # noqa: PLR0913
    """A Source over arrays already in memory (digits, IDX files, sprites' factors)."""

    def read(a: int, b: int) -> Chunk:
        return Chunk(a, keys(a, b), x[a:b], None if labels is None else labels[a:b])

    return Source(
        name, len(x), tuple(x.shape[1:]), str(x.dtype), divide_by, scaling, version, read, keys,
        classes, labels is not None,
    )  # fmt: skip


def _row_keys(prefix: str, width: int) -> Callable[[int, int], list[str]]:
    return lambda a, b: [f"{prefix}-{i:0{width}d}" for i in range(a, b)]


def open_digits() -> Source:
    """scikit-learn's 8x8 digits (1797 images, shipped with the package: no network); their
    values are the integers 0..16."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = bunch.data.astype(np.uint8).reshape(-1, 1, 8, 8)
    classes = [str(i) for i in range(10)]
    return _in_memory(
        "digits", _row_keys("digits", 5), x, bunch.target.astype(np.int64),
        _digest(bunch.data, bunch.target), classes, 16.0, "x/16",
    )  # fmt: skip


def open_mnist(source: str, cache_dir: Path, base_url: str | None = None) -> Source:
    """MNIST or Fashion-MNIST, official train and test parts together (keys say which)."""
    from pipelines.data.sources.idx import CLASSES, load_idx_dataset

    arrays, version = load_idx_dataset(source, cache_dir / source, base_url)
    n_train = len(arrays["train_images"])
    x = np.concatenate([arrays["train_images"], arrays["test_images"]])[:, None]
    labels = np.concatenate([arrays["train_labels"], arrays["test_labels"]]).astype(np.int64)

    def keys(a: int, b: int) -> list[str]:
        return [
            f"{source}-train-{i:05d}" if i < n_train else f"{source}-test-{i - n_train:05d}"
            for i in range(a, b)
        ]

    return _in_memory(source, keys, x, labels, version, CLASSES[source], 255.0, "x/255")


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


def _to_nchw(x: np.ndarray, path: Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
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
        f"{path} has shape {shape or x.shape}; need (N, H, W), (N, C, H, W) or (N, H, W, C) with C 1 "
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


class _NpyRows:
    """Rows of a C-ordered .npy file, read with plain file reads: unlike a memory map, pages
    already read do not stay resident, so staging's memory does not grow with the file."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, offset: int) -> None:
        self.path, self.shape, self.dtype, self.offset = path, shape, dtype, offset
        self.ndim, self.size = len(shape), math.prod(shape)
        self.row_items = math.prod(shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        a, b, _ = rows.indices(self.shape[0])
        b = max(a, b)
        with self.path.open("rb") as f:
            f.seek(self.offset + a * self.row_items * self.dtype.itemsize)
            x = np.fromfile(f, dtype=self.dtype, count=(b - a) * self.row_items)
        return x.reshape((b - a, *self.shape[1:]))


def _npy_rows(path: Path):
    """A row reader for the .npy file (a memory map where plain reads cannot do)."""
    fmt = np.lib.format
    with path.open("rb") as f:
        version = fmt.read_magic(f)
        if version in ((1, 0), (2, 0)):
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read(f)
            if not fortran and len(shape) >= 1 and not dtype.hasobject:
                return _NpyRows(path, tuple(shape), dtype, f.tell())
    return _loaded(lambda: np.load(path, mmap_mode="r", allow_pickle=False), str(path))


def _open_array_file(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The images (read rows at a time for a .npy) and labels of an array file."""
    if _check_array_path(path) == "npy":
        with path.open("rb") as f:
            _check_npy_header(f, path.stat().st_size, str(path))
        return _npy_rows(path), None
    return _read_array_file(path)  # .npz members are compressed: read whole


def open_array(path: Path) -> Source:
    """A .npy array or .npz with 'x' (and optional 'y' labels); keys are row numbers.

    uint8/integer images are stored as uint8 (0..255), floats must already be in [0, 1] and stay
    float32. Keys follow row order, so append new rows at the end to keep old samples (and
    their shards) where they are.
    """
    raw, labels = _open_array_file(path)
    if raw.dtype.kind not in "biuf":
        raise PipelineError(
            f"{path} has dtype {raw.dtype}; need numbers (uint8 0..255 or floats in [0, 1])"
        )
    shape = _to_nchw(raw[0:0] if raw.ndim else raw, path, raw.shape).shape[1:]  # checks layout
    if raw.size == 0:
        raise PipelineError(f"{path} holds no samples (shape {raw.shape}); add data to it")
    if labels is not None:
        labels = _check_labels(labels, len(raw), path)
    keys = _row_keys("array", 7)
    integer = raw.dtype.kind in "biu"
    divide_by, scaling = (255.0, "x/255") if raw.dtype.kind in "iu" else (1.0, "none")
    if raw.dtype.kind == "b":
        divide_by, scaling = 1.0, "x (booleans)"

    def read(a: int, b: int) -> Chunk:
        ks = keys(a, b)
        chunk = _to_nchw(_loaded(lambda: np.asarray(raw[a:b]), str(path)), path)
        if integer:
            chunk = _checked_uint8(ks, chunk, path)
        else:
            check_range(ks, chunk, where=str(path))  # before float32 turns 1e300 into inf
            chunk = chunk.astype(np.float32)
        return Chunk(a, ks, chunk, None if labels is None else labels[a:b])

    dtype = "uint8" if integer else "float32"
    return Source(
        "array", len(raw), tuple(shape), dtype, divide_by, scaling, _file_digest(path), read,
        keys, None, labels is not None, path.name,
    )  # fmt: skip


def _checked_uint8(keys: list[str], x: np.ndarray, path: Path) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.bool_:
        return x.astype(np.uint8)
    out = (x < 0) | (x > 255)
    if out.any():
        i = _first_bad(out)
        row = int(keys[i].rsplit("-", 1)[1])
        raise PipelineError(
            f"sample {keys[i]} (row {row} of {path}) has integer values outside 0..255; "
            "save uint8 images or floats in [0, 1]"
        )
    return x.astype(np.uint8)


def _file_digest(path: Path) -> str:
    return "sha256:" + file_hash(path)[:16]


def open_images(folder: Path, size: tuple[int, int], grayscale: bool, crop: bool) -> Source:
    from pipelines.data.sources.images import (
        open_image_folder,
    )  # (lazy: PIL only for image folders)

    return open_image_folder(folder, tuple(size), grayscale, crop)


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


def open_source(params: DataParams, root: Path | None = None) -> Source:
    """The configured source, binarised if asked; relative paths resolve against root (or cwd)."""
    root = Path.cwd() if root is None else Path(root)

    def resolve(p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else root / path

    if params.source == "digits":
        src = open_digits()
    elif params.source == "sprites":
        src = open_sprites(params.size)
    elif params.source in ("mnist", "fashion_mnist"):
        src = open_mnist(params.source, resolve(params.cache_dir), params.download_url)
    elif params.path is None:
        what = "a .npy/.npz file" if params.source == "array" else "a folder of PNG/JPEG images"
        raise PipelineError(f"data.source {params.source} needs data.path ({what})")
    elif params.source == "array":
        src = open_array(resolve(params.path))
    else:
        src = open_images(
            resolve(params.path), params.image_size, params.grayscale, params.center_crop
        )
    if src.shape[0] not in (1, 3):
        raise PipelineError(f"source {src.name} gave {src.shape[0]} channels; need 1 or 3")
    return binarized(src) if params.binarize else src


def binarized(src: Source) -> Source:
    """Threshold at half intensity, stored as uint8 0/1: a deterministic, recorded transform."""
    read = src.read

    def read_binary(a: int, b: int) -> Chunk:
        c = read(a, b)
        c.x = (c.x.astype(np.float32) / np.float32(src.divide_by) >= 0.5).astype(np.uint8)
        return c

    return Source(
        src.name, src.n, src.shape, "uint8", 1.0, f"({src.scaling}) >= 0.5", src.version,
        read_binary, src.keys, src.classes, src.has_labels, src.file, src.factors,
    )  # fmt: skip


def load_source(params: DataParams, root: Path | None = None) -> SourceData:
    """The whole configured source in memory, float32 in [0, 1]."""
    return materialise(open_source(params, root))


def load_array(path: Path) -> SourceData:
    return materialise(open_array(path))


def materialise(src: Source) -> SourceData:
    x = np.empty((src.n, *src.shape), dtype=np.float32)
    keys: list[str] = []
    labels = np.empty(src.n, dtype=np.int64) if src.has_labels else None
    for c in src.chunks():
        x[c.start : c.start + len(c.keys)] = c.x.astype(np.float32) / np.float32(src.divide_by)
        keys += c.keys
        if labels is not None:
            labels[c.start : c.start + len(c.keys)] = c.labels
    return SourceData(keys, x, labels, src.name, src.version, src.classes, src.scaling)
