"""Writing shards: gzip'd ustar tars, byte-deterministic (fixed mtimes, owner and mode), with a split's samples dealt round-robin over its shards."""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipelines.data.shards.format import (
    FACTORS_MEMBER,
    TAR_MTIME,
    shard_name,
)
from pipelines.data.versioning.hashing import file_hashes

# zlib's default level, as the gzip tool's. Level 9 spent two thirds of staging's time (1.9 s
# a 13 MB Fashion-MNIST shard against 0.15 s) for shards 2% smaller, read no faster.
COMPRESS_LEVEL = 6

# np.save's header for each (dtype, shape): the same for every sample of a source, and the
# header is most of np.save's time.
_NPY_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def _npy_bytes(x: np.ndarray) -> bytes:
    """x as np.save writes it, byte for byte."""
    x = np.ascontiguousarray(x)
    header = _NPY_HEADERS.get((x.dtype.str, x.shape))
    if header is None:
        buf = io.BytesIO()
        np.save(buf, x, allow_pickle=False)
        data = buf.getvalue()
        header = _NPY_HEADERS.setdefault((x.dtype.str, x.shape), data[: len(data) - x.nbytes])
    return header + x.tobytes()


_TAR_TEMPLATES: dict[int, tuple[bytes, int]] = {}


def _tar_header(name: str, size: int) -> bytes:
    """The ustar header tarfile writes for one of our members, byte for byte. tarfile builds
    each from scratch (a third of staging's time once compression was cheap); here only the
    name and the checksum change, on a template made by tarfile for each size."""
    raw = name.encode("utf-8")
    if len(raw) > 100:  # tarfile splits it into a prefix
        return _tarfile_header(name, size)
    if size not in _TAR_TEMPLATES:
        template = _tarfile_header("", size)  # an empty name: the name adds its own bytes
        _TAR_TEMPLATES[size] = (template, tarfile.calc_chksums(template)[0])
    template, base = _TAR_TEMPLATES[size]
    chk = b"%06o\0" % (base + sum(raw))
    return raw + template[len(raw) : 148] + chk + template[155:]


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, 0o444
    info.uname = info.gname = "bigdata"
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


class _Shard:
    """One gzip-compressed tar shard being written, byte-deterministic (fixed mtimes, owner).

    The tar headers are written here rather than by tarfile/wds.TarWriter: tarfile keeps every
    member's TarInfo until the archive closes, which made staging's memory grow with the data."""

    def __init__(self, path: Path) -> None:
        self.path, self.samples, self.size = path, 0, 0
        self._raw = path.open("wb")
        # filename "" and mtime 0: the gzip header holds neither a name nor a time.
        self._gz = gzip.GzipFile(
            filename="", mode="wb", fileobj=self._raw, mtime=0, compresslevel=COMPRESS_LEVEL
        )

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        blocks = []
        for member, data in sample.items():
            if member != "__key__":
                pad = -len(data) % tarfile.BLOCKSIZE
                blocks += [_tar_header(f"{key}.{member}", len(data)), data, b"\0" * pad]
        block = b"".join(blocks)  # one write a sample: GzipFile.write costs microseconds a call
        self._gz.write(block)
        self.size += len(block)
        self.samples += 1

    def close(self) -> dict:
        end = 2 * tarfile.BLOCKSIZE  # two zero blocks, then zeros to a whole record, as tar does
        end += -(self.size + end) % tarfile.RECORDSIZE
        self._gz.write(b"\0" * end)
        self._gz.close()
        self._raw.close()
        sha256, md5 = file_hashes(self.path, "sha256", "md5")  # md5: what DVC names it by
        return {
            "name": self.path.name,
            "samples": self.samples,
            "bytes": self.path.stat().st_size,
            "sha256": sha256,
            "md5": md5,
        }


class SplitWriter:
    """Deals one split's samples of one generation over its shards, round-robin: each shard gets
    every S-th sample, so shards mix the whole stream (classes included) even when the source
    is sorted. Past MAX_OPEN shards the samples are cut into consecutive groups of shards, so
    no more than MAX_OPEN files are open at once. Each closed shard goes to on_closed (if any)."""

    MAX_OPEN = 64

    def __init__(
        self, folder: Path, split: str, n: int, shards: int, first: int, on_closed=None,
        owned: frozenset[int] | None = None,
    ) -> None:  # fmt: skip
        self.folder, self.split, self.n, self.shards, self.first = folder, split, n, shards, first
        self.on_closed: Callable[[Path], None] | None = on_closed
        # The shards (positions 0..shards-1) this writer writes; the others' samples are only
        # counted, so that parallel writers each write theirs with the same dealing.
        self.owned = owned
        self.seen, self.entries = 0, []
        self.open: list[_Shard] = []
        self.group, self.start, self.size = -1, 0, 0  # the open group, its first sample, shards

    def _bounds(self, group: int) -> tuple[int, int, int]:
        """First shard, shard count and first sample of a group."""
        lo = group * self.MAX_OPEN
        hi = min(self.shards, lo + self.MAX_OPEN)
        return lo, hi - lo, self.n * lo // self.shards

    def positions(self, numbers: np.ndarray) -> np.ndarray:
        """The shard (0..shards-1) each of the split's sample numbers (0, 1, ... in dealing
        order) goes to: the dealing of write, without writing."""
        groups = -(-self.shards // self.MAX_OPEN)
        starts = np.array([self._bounds(g)[2] for g in range(groups)], dtype=np.int64)
        group = np.searchsorted(starts, numbers, side="right") - 1
        lo = group * self.MAX_OPEN
        size = np.minimum(self.shards, lo + self.MAX_OPEN) - lo
        return lo + (numbers - starts[group]) % size

    def write(self, sample: Callable[[], dict], number: int | None = None) -> None:
        """The split's sample number `number` (the next one by default; numbers only grow),
        made (encoded) only if its shard is written here. A pass that writes some shards hands
        over only their samples, each with its number."""
        if number is not None:
            self.seen = number
        group = self.group
        while (
            group + 1 < -(-self.shards // self.MAX_OPEN) and self.seen >= self._bounds(group + 1)[2]
        ):
            group += 1
        if group != self.group:
            self._close_open()
            lo, self.size, self.start = self._bounds(group)
            self.group = group
            self.open = [
                _Shard(self.folder / shard_name(self.split, self.first + lo + i))
                if self.owned is None or lo + i in self.owned
                else None
                for i in range(self.size)
            ]
        shard = self.open[(self.seen - self.start) % self.size]
        if shard is not None:
            shard.write(sample())
        self.seen += 1

    def _close_open(self) -> None:
        mine = [shard for shard in self.open if shard is not None]
        self.entries += [shard.close() for shard in mine]
        if self.on_closed is not None:
            for shard in mine:
                self.on_closed(shard.path)
        self.open = []

    def close(self) -> list[dict]:
        self._close_open()
        return self.entries


def label_bytes(labels: np.ndarray | None, i: int) -> bytes | None:
    """Sample i's label as its `cls` member stores it (decimal digits), None without labels."""
    return None if labels is None else str(int(labels[i])).encode()


def encode_sample(key: str, x: np.ndarray, label: bytes | None, factors: np.ndarray | None) -> dict:
    sample = {"__key__": key, "npy": _npy_bytes(x)}
    if label is not None:
        sample["cls"] = label
    if factors is not None:
        sample[FACTORS_MEMBER] = _npy_bytes(factors)
    return sample
