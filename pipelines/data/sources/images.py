"""A folder of PNG/JPEG images, greyscale or RGB, resized to one size.

Images directly in the folder have no labels; images in subfolders (`cats/001.png`) are labelled
by subfolder name, like torchvision's ImageFolder. Hidden files (`.DS_Store`) are ignored; any
other non-image file is an error, so a stray file is never silently dropped or silently trained on.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from pipelines.data.sources.base import Chunk, Source
from pipelines.errors import PipelineError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def image_key(rel: Path) -> str:
    """A WebDataset-safe key from the path: no dots (they separate key and extension)."""
    return "img-" + _UNSAFE.sub("_", rel.as_posix())


def list_images(folder: Path) -> list[Path]:
    """Image paths relative to folder, sorted; raises on anything that is not an image."""
    if not folder.is_dir():
        raise PipelineError(
            f"images folder {folder} not found; set data.path to a folder of PNG/JPEG"
        )
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise PipelineError(
                f"{path} is not a PNG/JPEG image; remove it from {folder} or convert it"
            )
        files.append(rel)
    if not files:
        raise PipelineError(f"images folder {folder} holds no PNG/JPEG files; add images to it")
    return files


def _classes(files: list[Path], folder: Path) -> list[str] | None:
    nested = [len(f.parts) > 1 for f in files]
    if not any(nested):
        return None
    if not all(nested):
        top = files[nested.index(False)]
        raise PipelineError(
            f"{folder / top} sits beside class subfolders; move it into a subfolder "
            "(labels come from subfolder names) or flatten the folder"
        )
    return sorted({f.parts[0] for f in files})


def _centre_crop(img, size: tuple[int, int]):
    """The largest centred region with the aspect ratio of size (H, W): resizing it keeps the
    subject's proportions instead of squashing a landscape photo into a square."""
    w, h = img.size
    want = size[1] / size[0]  # width / height
    if w / h > want:
        cw, ch = round(h * want), h
    else:
        cw, ch = w, round(w / want)
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def read_image(
    path: Path, size: tuple[int, int], grayscale: bool, crop: bool = False
) -> np.ndarray:
    """(C, H, W) uint8; size is (H, W); crop: centre-crop to size's aspect ratio first."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if grayscale else "RGB")
            if crop:
                img = _centre_crop(img, size)
            if img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(f"cannot read image {path} ({reason}); fix or remove it") from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _keys(files: list[Path], folder: Path) -> list[str]:
    keys, seen = [], {}
    for rel in files:
        key = image_key(rel)
        if key in seen:
            raise PipelineError(
                f"{folder / rel} and {folder / seen[key]} map to the same sample key {key}; "
                "rename one of them"
            )
        seen[key] = rel
        keys.append(key)
    return keys


def _folder_digest(folder: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for rel in files:
        path = folder / rel
        digest.update(rel.as_posix().encode() + hashlib.sha256(path.read_bytes()).digest())
    return "sha256:" + digest.hexdigest()[:16]


def open_image_folder(folder: Path, size: tuple[int, int], grayscale: bool, crop: bool = False):
    """A Source over the folder's images in sorted path order, read and resized chunk by chunk
    (uint8, scaled by the loader); labels from subfolder names."""

    files = list_images(folder)
    classes = _classes(files, folder)
    keys = _keys(files, folder)
    labels = None
    if classes is not None:
        index = {name: i for i, name in enumerate(classes)}
        labels = np.array([index[f.parts[0]] for f in files], dtype=np.int64)
    channels = 1 if grayscale else 3

    def read(a: int, b: int) -> Chunk:
        x = np.empty((b - a, channels, *size), dtype=np.uint8)
        for i in range(a, b):
            x[i - a] = read_image(folder / files[i], size, grayscale, crop)
        return Chunk(a, keys[a:b], x, None if labels is None else labels[a:b])

    def read_rows(rows: np.ndarray) -> Chunk:
        x = np.empty((len(rows), channels, *size), dtype=np.uint8)
        for j, i in enumerate(rows.tolist()):
            x[j] = read_image(folder / files[i], size, grayscale, crop)
        start = int(rows[0]) if len(rows) else 0
        return Chunk(start, [keys[i] for i in rows], x, None if labels is None else labels[rows])

    return Source(
        "images", len(files), (channels, *size), "uint8", 255.0, "x/255",
        _folder_digest(folder, files), read, lambda a, b: keys[a:b], classes,
        labels is not None, folder.name, None, read_rows,
    )  # fmt: skip
