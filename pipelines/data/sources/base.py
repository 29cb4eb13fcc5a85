"""What every data source is, apart from how it reads: a `Source` yields `Chunk`s of samples
with stable keys; `SourceData` is a whole source in memory. The readers (catalog.py, arrays.py, images.py)
build on this module, which imports neither of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

CHUNK = 4096  # samples read, checked and written at a time


@dataclass
class Chunk:
    start: int  # position of the first sample in the source's order
    keys: list[str]
    x: np.ndarray  # (n, C, H, W) in the source's dtype (uint8 or float32)
    labels: np.ndarray | None  # int64 (n,)
    factors: np.ndarray | None = None  # int64 (n, k): generative factors, where known


@dataclass
class Source:
    """A data source read in order, chunk by chunk. Appending samples to a source (rows at the
    end of an array, images whose names sort last) keeps the earlier ones at their positions,
    which is what lets staging keep their shards."""

    name: str
    n: int
    shape: tuple[int, int, int]  # (C, H, W)
    dtype: str  # "uint8" | "float32": what the shards store
    divide_by: float  # stored value / divide_by lies in [0, 1]
    scaling: str  # the same, in words, e.g. "x/255"
    version: str  # content digest: changes exactly when the data changes
    read: Callable[[int, int], Chunk]  # samples [start, stop), checked
    keys: Callable[[int, int], list[str]]  # their keys alone (cheap: no pixels read)
    classes: list[str] | None = None
    has_labels: bool = False
    file: str | None = None  # the file or folder name (no path: manifests are portable)
    factors: dict | None = None  # {"names": [...], "sizes": [...]} of Chunk.factors' columns
    # The samples at the given positions (sorted, any gaps), without reading those between:
    # set where that is cheaper than reading the range (rendered or decoded samples).
    read_rows: Callable[[np.ndarray], Chunk] | None = None

    def chunks(self, size: int = CHUNK, start: int = 0) -> Iterator[Chunk]:
        for a in range(start, self.n, size):
            yield self.read(a, min(self.n, a + size))

    def rows(self, a: int, b: int, picked: list[int]) -> Chunk:
        """The samples at positions a + picked (sorted offsets into [a, b)), in that order."""
        if self.read_rows is not None:
            return self.read_rows(a + np.asarray(picked, dtype=np.int64))
        c = self.read(a, b)
        return Chunk(
            a, [c.keys[i] for i in picked], c.x[picked],
            None if c.labels is None else c.labels[picked],
            None if c.factors is None else c.factors[picked],
        )  # fmt: skip


@dataclass
class SourceData:
    """A whole source in memory, as float32 in [0, 1] (small data, quickstart, embed)."""

    keys: list[str]
    x: np.ndarray  # float32, (N, C, H, W), values in [0, 1]
    labels: np.ndarray | None  # int64 (N,) where the source has labels
    source: str
    version: str
    classes: list[str] | None = None
    scaling: str = "none"


def row_keys(prefix: str, width: int) -> Callable[[int, int], list[str]]:
    return lambda a, b: [f"{prefix}-{i:0{width}d}" for i in range(a, b)]
