"""The shard writer's shortcuts write exactly what the standard tools write: each tar header is
tarfile's, each .npy member is np.save's, and a shard is a gzip stream that tarfile and numpy
read back whole."""

from __future__ import annotations

import gzip
import io
import tarfile

import numpy as np
import pytest

from pipelines.data.shards.writer import _npy_bytes, _Shard, _tar_header, _tarfile_header


@pytest.mark.parametrize(
    "name",
    ["a.npy", "fashion_mnist-0000001.cls", "k" * 95 + ".npy", "x" * 100, "ünï-cødé.npy", "k.a.b"],
)
@pytest.mark.parametrize("size", [0, 1, 511, 512, 3_136, 16_384, 8**11 - 1])
def test_every_tar_header_is_the_one_tarfile_writes(name, size):
    assert _tar_header(name, size) == _tarfile_header(name, size)


def test_a_name_too_long_for_the_name_field_is_left_to_tarfile():
    name = "folder/" * 20 + "k.npy"
    assert _tar_header(name, 10) == _tarfile_header(name, 10)
    assert tarfile.TarInfo.frombuf(_tar_header(name, 10), "utf-8", "strict").name == name


@pytest.mark.parametrize(
    "x",
    [
        np.arange(784, dtype=np.uint8).reshape(28, 28),
        np.linspace(0, 1, 3 * 64 * 64, dtype=np.float32).reshape(3, 64, 64),
        np.arange(6, dtype=np.int64),
        np.float32(2.5).reshape(()),
        np.arange(12, dtype=np.float32).reshape(3, 4).T,  # not contiguous: stored as C order
        np.arange(4, dtype=">f8"),
    ],
)
def test_every_npy_member_is_what_np_save_writes(x):
    for _ in range(2):  # the first call makes the cached header, the second uses it
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(x), allow_pickle=False)
        assert _npy_bytes(x) == buf.getvalue()


def test_a_written_shard_reads_back_with_tarfile_and_numpy(tmp_path):
    shard = _Shard(tmp_path / "train-000000.tar.gz")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    for i, x in enumerate(images):
        shard.write({"__key__": f"s{i:04d}", "npy": _npy_bytes(x), "cls": str(i % 10).encode()})
    entry = shard.close()
    with tarfile.open(tmp_path / "train-000000.tar.gz") as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:3]] == ["s0000.npy", "s0000.cls", "s0001.npy"]
        assert all(m.mode == 0o444 and m.mtime == 0 and m.uname == "bigdata" for m in members)
        got = [
            np.load(io.BytesIO(tar.extractfile(m).read()))
            for m in members
            if m.name.endswith(".npy")
        ]
    assert np.array_equal(np.stack(got), images) and entry["samples"] == 30
    raw = gzip.decompress((tmp_path / "train-000000.tar.gz").read_bytes())
    assert len(raw) % tarfile.RECORDSIZE == 0
