"""Odd files and arrays given to the array source, table-driven through `vae-pipeline stage`.

Each must end with exit code 2 and one stderr line that names the file and says what is
expected; nothing may be unpickled, allocated from a lying header, or written.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli import main
from tests.helpers.params import DEFAULTS, REPO


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Path], Path]  # scratch folder -> the file (or folder) data.path names
    expects: str  # the error line must contain this (what is expected, or what is wrong)


def _npy(arr: np.ndarray, name: str = "x.npy", **kw) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        np.save(tmp / name, arr, **kw)
        return tmp / name

    return make


def _npz(name: str = "x.npz", **arrays: np.ndarray) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        np.savez(tmp / name, **arrays)
        return tmp / name

    return make


def _bytes(data: bytes, name: str = "x.npy") -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name

    return make


def _folder(tmp: Path) -> Path:
    (tmp / "arrays.npy").mkdir()
    return tmp / "arrays.npy"


class _Boom:
    """Unpickling this would create the marker file: proof that a load ran pickle."""

    def __reduce__(self):
        return (open, (str(Path(os.environ["MARKER_DIR"]) / "unpickled"), "w"))


def _header_claiming(shape: tuple[int, ...]) -> bytes:
    """A valid .npy header for a huge array, followed by almost no data."""
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    text = repr(header).encode()
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + b"\0" * 16


IMAGES = np.random.default_rng(0).random((40, 8, 8), dtype=np.float32)
EXPECT_SHAPE = "need (N, H, W), (N, C, H, W) or (N, H, W, C) with C 1 or 3"
EXPECT_NUMBERS = "need numbers (uint8 0..255 or floats in [0, 1])"
EXPECT_LABELS = "need one integer label per sample"
EXPECT_FILE = "save images with np.save, or np.savez"

CASES = [
    # -- files that are not arrays --------------------------------------------------------------
    Case("text-file", _bytes(b"0.1 0.2 0.3\n" * 20), "is not a NumPy .npy/.npz file"),
    Case("garbage-bytes", _bytes(os.urandom(512)), "is not a NumPy .npy/.npz file"),
    Case("empty-file", _bytes(b""), "is not a NumPy .npy/.npz file"),
    Case(
        "plain-pickle",
        lambda tmp: _bytes(pickle.dumps(_Boom()))(tmp),
        "is not a NumPy .npy/.npz file",
    ),
    Case("damaged-header", _bytes(b"\x93NUMPY\x01\x00" + b"\xff" * 64), "damaged .npy header"),
    Case("header-lies-about-size", _bytes(_header_claiming((10**12, 8, 8))), "is truncated"),
    Case("truncated-npy", lambda tmp: _truncated(tmp), "is truncated"),
    Case("text-named-npz", _bytes(b"hello", "x.npz"), "is not a NumPy .npy/.npz file"),
    Case("damaged-npz", lambda tmp: _damaged_npz(tmp), "x.npz"),
    Case("folder", _folder, "is a folder; data.source array needs a .npy or .npz file"),
    Case("csv-suffix", _bytes(b"1,2,3\n", "x.csv"), "reads .npy or .npz files"),
    Case("no-suffix", _bytes(b"1,2,3\n", "images"), "reads .npy or .npz files"),
    # -- pickled objects: refused from the header, never loaded ----------------------------------
    Case("pickled-object-npy", _npy(np.array([_Boom()], object), allow_pickle=True), "objects"),
    Case("pickled-object-npz", _npz(x=np.array([_Boom()], object)), "objects"),
    Case("pickled-labels-npz", _npz(x=IMAGES, y=np.array([_Boom()] * 40, object)), "objects"),
    # -- npz layout ------------------------------------------------------------------------------
    Case("npz-without-x", _npz(a=IMAGES, b=IMAGES), "none named 'x'"),
    Case("npz-empty", _npz(), "holds no arrays"),
    # -- dimensionality and channels ---------------------------------------------------------------
    Case("0-d", _npy(np.float32(0.5)), EXPECT_SHAPE),
    Case("0-d-in-npz", _npz(x=np.float32(0.5)), EXPECT_SHAPE),
    Case("1-d", _npy(np.zeros(64, np.float32)), EXPECT_SHAPE),
    Case("2-d", _npy(np.zeros((40, 64), np.float32)), EXPECT_SHAPE),
    Case("5-d", _npy(np.zeros((4, 1, 1, 8, 8), np.float32)), EXPECT_SHAPE),
    Case("nhwc-2-channels", _npy(np.zeros((40, 8, 8, 2), np.float32)), EXPECT_SHAPE),
    Case("nhwc-5-channels", _npy(np.zeros((40, 8, 8, 5), np.float32)), EXPECT_SHAPE),
    Case("nhwc-rgba", _npy(np.zeros((40, 8, 8, 4), np.uint8)), "drop the alpha channel"),
    Case("zero-samples", _npy(np.zeros((0, 8, 8), np.uint8)), "holds no samples"),
    Case("zero-height", _npy(np.zeros((40, 0, 8), np.uint8)), "holds no samples"),
    # -- dtypes ------------------------------------------------------------------------------------
    Case("complex", _npy(np.zeros((40, 8, 8), np.complex64)), EXPECT_NUMBERS),
    Case("unicode", _npy(np.full((40, 8, 8), "a")), EXPECT_NUMBERS),
    Case("bytes", _npy(np.full((40, 8, 8), b"a")), EXPECT_NUMBERS),
    Case("structured", _npy(np.zeros((40, 8, 8), [("a", "f4"), ("b", "i4")])), EXPECT_NUMBERS),
    Case("datetime", _npy(np.zeros((40, 8, 8), "datetime64[s]")), EXPECT_NUMBERS),
    # -- labels ------------------------------------------------------------------------------------
    Case("labels-too-few", _npz(x=IMAGES, y=np.arange(39)), EXPECT_LABELS),
    Case("labels-float", _npz(x=IMAGES, y=np.zeros(40, np.float32)), EXPECT_LABELS),
    Case("labels-bool", _npz(x=IMAGES, y=np.zeros(40, bool)), EXPECT_LABELS),
    Case("labels-strings", _npz(x=IMAGES, y=np.array(["cat"] * 40)), EXPECT_LABELS),
    Case("labels-2-d", _npz(x=IMAGES, y=np.zeros((40, 2), np.int64)), EXPECT_LABELS),
    Case("labels-0-d", _npz(x=IMAGES, y=np.int64(3)), EXPECT_LABELS),
    Case("labels-past-int64", _npz(x=IMAGES, y=np.full(40, 2**63 + 5, np.uint64)), EXPECT_LABELS),
]


def _truncated(tmp: Path) -> Path:
    np.save(tmp / "x.npy", IMAGES)
    data = (tmp / "x.npy").read_bytes()
    (tmp / "x.npy").write_bytes(data[: len(data) // 2])
    return tmp / "x.npy"


def _damaged_npz(tmp: Path) -> Path:
    np.savez(tmp / "x.npz", x=IMAGES)
    data = bytearray((tmp / "x.npz").read_bytes())
    data[200:260] = b"\0" * 60  # inside x.npy's data: the zip CRC no longer matches
    (tmp / "x.npz").write_bytes(bytes(data))
    return tmp / "x.npz"


def test_the_table_covers_every_kind_of_odd_array_input():
    assert len({c.id for c in CASES}) == len(CASES) >= 35


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_odd_array_input_is_one_line_exit_2_naming_the_file(case, tmp_path, capsys, monkeypatch):
    scratch = tmp_path / "in"
    scratch.mkdir()
    monkeypatch.setenv("MARKER_DIR", str(tmp_path))
    path = case.make(scratch)
    shards = tmp_path / "shards"
    capsys.readouterr()

    code = main(
        [
            "stage",
            "--params", str(REPO / "params.yaml"),
            "--quiet",
            "--set", "data.source=array",
            "--set", f"data.path={path}",
            "--set", f"data.shards_dir={shards}",
        ]
    )  # fmt: skip

    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert str(path) in err, err
    assert case.expects in err, err
    assert not (tmp_path / "unpickled").exists(), "a pickle was loaded"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"], "staging wrote something"


def test_boolean_images_stage_as_zeros_and_ones(tmp_path, small_params):
    from pipelines.data.sources.catalog import load_source

    x = np.random.default_rng(0).random((50, 4, 4)) > 0.5
    np.save(tmp_path / "b.npy", x)
    data = load_source(
        small_params("data.source=array", f"data.path={tmp_path / 'b.npy'}", preset=DEFAULTS).data
    )
    assert data.x.dtype == np.float32 and set(np.unique(data.x)) == {0.0, 1.0}
    np.testing.assert_array_equal(data.x[:, 0], x.astype(np.float32))
