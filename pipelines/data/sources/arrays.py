"""An array file as a source: a .npy of images, or a .npz with images and labels, checked before
it is read (header, shape, dtype, range) so that a bad file is one line, not a traceback."""

from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np

from pipelines.data.sources.base import Chunk, Source, row_keys
from pipelines.data.versioning.hashing import file_hash
from pipelines.errors import PipelineError

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
    keys = row_keys("array", 7)
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
