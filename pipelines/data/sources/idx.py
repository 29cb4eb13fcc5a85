"""MNIST and Fashion-MNIST: find or download the four IDX files, parse them with numpy.

torchvision is not installable beside our torch build, so this is the small part of it we need.
Where the files come from, first found first: the cache folder (a user without network can put
them there by hand), the folder a Debian package installs them in (`apt-get install
dataset-fashion-mnist`: read in place, no copy, no network), then a download, checked against
the published MD5 before it enters the cache.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from pipelines.data.versioning.hashing import file_hash
from pipelines.errors import PipelineError

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion_mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
}
# The published checksums (the same ones torchvision verifies).
MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
# Debian's packages (MIT licence) put the four files here; Debian re-compressed the .gz files,
# so their MD5s differ from the published ones while the contents are the same.
SYSTEM_FOLDERS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}
APT_PACKAGES = {"fashion_mnist": "dataset-fashion-mnist"}
CLASSES = {
    "mnist": [str(i) for i in range(10)],
    "fashion_mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
}
# IDX type byte -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file, gzipped or not (detected from its first bytes, not its name)."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise PipelineError(
                f"{path} is a damaged gzip file ({exc}); delete it so it is downloaded again"
            ) from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise PipelineError(
            f"{path} is not an IDX file (bad magic number); delete it so it is downloaded again"
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise PipelineError(f"{path} is truncated inside its IDX header; delete it and re-download")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise PipelineError(
            f"{path} has {len(raw)} bytes but its IDX header {shape} implies {expected}; "
            "delete it and re-download"
        )
    # No copy where the byte order cannot matter (uint8 images: a copy of 47 MB cost 0.3 s of
    # page faults per staging task); the array is then read-only, as the bytes it views.
    return (
        np.frombuffer(raw, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="), copy=False)
    )


def _md5(path: Path) -> str:
    return file_hash(path, "md5")


def _download(url: str, dest: Path, md5: str, timeout: float) -> None:
    """Download to a temporary file beside dest, check it, then rename: no partial files."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
        if _md5(Path(tmp)) != md5:
            raise PipelineError(f"{url} does not match its published MD5 {md5}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cached(folder: Path, name: str) -> Path | None:
    """The file as downloaded (.gz) or as a user may have unpacked it (no .gz)."""
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def fetch_idx_files(
    source: str, folder: Path, base_url: str | None = None, timeout: float = 30.0
) -> dict[str, Path]:
    """The four IDX files of `source`: in `folder`, else in the system folder of its Debian
    package (all four, used in place), else downloaded into `folder`."""
    system = SYSTEM_FOLDERS.get(source)
    if (
        not base_url
        and system is not None
        and all(_cached(folder, n) is None for n in FILES.values())
    ):
        found = {role: _cached(system, name) for role, name in FILES.items()}
        if all(found.values()):
            return found
    mirrors = (base_url,) if base_url else MIRRORS[source]
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for role, name in FILES.items():
        path = _cached(folder, name)
        if path is None:
            path = folder / name
            errors = []
            for mirror in mirrors:
                url = mirror.rstrip("/") + "/" + name
                try:
                    _download(url, path, MD5[source][name], timeout)
                    break
                except (urllib.error.URLError, OSError, PipelineError) as exc:
                    reason = getattr(exc, "reason", exc)
                    errors.append(f"{url}: {reason}")
            else:
                wanted = ", ".join(FILES.values())
                apt = APT_PACKAGES.get(source)
                offline = f"'apt-get install {apt}' (read offline), " if apt else ""
                raise PipelineError(
                    f"cannot download {source} ({'; '.join(errors)}); {offline}put the four IDX "
                    f"files ({wanted}) into {folder}, or set data.source: digits"
                )
        paths[role] = path
    return paths


def load_idx_dataset(
    source: str, folder: Path, base_url: str | None = None
) -> tuple[dict[str, np.ndarray], str]:
    """Images (N, 28, 28) uint8 and labels per official part ('train', 'test'), plus a digest.

    The digest is over the parsed arrays, so a gzipped and an unpacked copy give the same one.
    """
    paths = fetch_idx_files(source, folder, base_url)
    digest = hashlib.sha256()
    arrays = {}
    for role in FILES:
        arr = read_idx(paths[role])
        digest.update(role.encode() + str(arr.shape).encode() + arr.tobytes())
        arrays[role] = arr
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise PipelineError(
                f"{source} {part} files disagree: images {images.shape}, labels {labels.shape}; "
                f"delete them from {folder} and download again"
            )
    return arrays, "sha256:" + digest.hexdigest()[:16]
