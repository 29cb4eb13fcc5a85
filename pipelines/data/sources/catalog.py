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
from pathlib import Path

import numpy as np

from pipelines.data.sources.arrays import open_array
from pipelines.data.sources.base import CHUNK, Chunk, Source, SourceData, row_keys
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

    def read_rows(positions: np.ndarray) -> Chunk:
        picked = indices[positions]
        factors = sprites.factors_of(picked)
        x = sprites.render(picked)[:, None]
        start = int(positions[0]) if len(positions) else 0
        keys_ = [sprites.sample_key(i) for i in picked]
        return Chunk(start, keys_, x, factors[:, 0].astype(np.int64), factors)

    spec = {"names": list(sprites.FACTOR_NAMES), "sizes": list(sprites.FACTOR_SIZES)}
    version = _digest(indices, np.asarray(sprites.FACTOR_SIZES))
    return Source(
        "sprites", n, (1, sprites.SIDE, sprites.SIDE), "uint8", 255.0, "x/255", version, read,
        keys, list(sprites.SHAPES), True, None, spec, read_rows,
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


def open_digits() -> Source:
    """scikit-learn's 8x8 digits (1797 images, shipped with the package: no network); their
    values are the integers 0..16."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = bunch.data.astype(np.uint8).reshape(-1, 1, 8, 8)
    classes = [str(i) for i in range(10)]
    return _in_memory(
        "digits", row_keys("digits", 5), x, bunch.target.astype(np.int64),
        _digest(bunch.data, bunch.target), classes, 16.0, "x/16",
    )  # fmt: skip


def open_mnist(source: str, cache_dir: Path, base_url: str | None = None) -> Source:
    """MNIST or Fashion-MNIST, official train and test parts together (keys say which)."""
    from pipelines.data.sources.idx import CLASSES, load_idx_dataset

    arrays, version = load_idx_dataset(source, cache_dir / source, base_url)
    parts = [arrays["train_images"][:, None], arrays["test_images"][:, None]]
    n_train = len(parts[0])
    labels = np.concatenate([arrays["train_labels"], arrays["test_labels"]]).astype(np.int64)

    def keys(a: int, b: int) -> list[str]:
        return [
            f"{source}-train-{i:05d}" if i < n_train else f"{source}-test-{i - n_train:05d}"
            for i in range(a, b)
        ]

    def read(a: int, b: int) -> Chunk:
        # The two parts are not concatenated: that copy cost each staging task 0.5 s.
        if b <= n_train or a >= n_train:
            x = parts[0][a:b] if b <= n_train else parts[1][a - n_train : b - n_train]
        else:
            x = np.concatenate([parts[0][a:], parts[1][: b - n_train]])
        return Chunk(a, keys(a, b), x, labels[a:b])

    return Source(
        source, len(labels), tuple(parts[0].shape[1:]), str(parts[0].dtype), 255.0, "x/255",
        version, read, keys, CLASSES[source], True,
    )  # fmt: skip


def open_images(folder: Path, size: tuple[int, int], grayscale: bool, crop: bool) -> Source:
    from pipelines.data.sources.images import (
        open_image_folder,
    )  # (lazy: PIL only for image folders)

    return open_image_folder(folder, tuple(size), grayscale, crop)


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
    read, read_rows = src.read, src.read_rows

    def binary(c: Chunk) -> Chunk:
        c.x = (c.x.astype(np.float32) / np.float32(src.divide_by) >= 0.5).astype(np.uint8)
        return c

    return Source(
        src.name, src.n, src.shape, "uint8", 1.0, f"({src.scaling}) >= 0.5", src.version,
        lambda a, b: binary(read(a, b)), src.keys, src.classes, src.has_labels, src.file,
        src.factors, None if read_rows is None else lambda rows: binary(read_rows(rows)),
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
