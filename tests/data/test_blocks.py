"""A whole shard decoded at once: regular shards take the array path, anything else the
per-sample path, and both give the same samples, labels, factors and bad-sample reports."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipelines.data.shards.blocks import _block_of_samples, _regular_block, read_block
from pipelines.data.shards.manifest import ShardEntry, read_manifest
from pipelines.data.shards.reader import tar_grouped
from pipelines.data.shards.writer import _Shard, encode_sample, label_bytes
from pipelines.data.staging import StageJob, stage_shards
from tests.helpers.params import params_in

SHAPE = (1, 3, 3)


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def _images(n: int, dtype=np.uint8) -> np.ndarray:
    return np.arange(n * 9, dtype=np.int64).reshape(n, *SHAPE).astype(dtype) % 251


def _written(tmp_path: Path, samples: list[dict]) -> ShardEntry:
    """A shard as staging writes it, of these samples (key and members' bytes)."""
    shard = _Shard(tmp_path / "train-000000.tar.gz")
    for sample in samples:
        shard.write(sample)
    return ShardEntry(**shard.close())


def _tarred(tmp_path: Path, members: list[tuple[str, bytes]], fmt=tarfile.USTAR_FORMAT):
    """A shard written by Python's tarfile, member by member, in any layout."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = gzip.compress(raw.getvalue())
    path = tmp_path / "train-000000.tar.gz"
    path.write_bytes(data)
    keys = {name.split(".")[0] for name, _ in members}
    return ShardEntry(name=path.name, samples=len(keys), bytes=len(data),
                      sha256=hashlib.sha256(data).hexdigest())  # fmt: skip


def _both_paths(path: Path, entry: ShardEntry, shape, dtype: str, factors: bool):
    tar = gzip.decompress(path.read_bytes())
    fast = _regular_block(tar, entry.samples, shape, dtype, factors)
    slow = _block_of_samples(tar_grouped(tar, str(path)), shape, dtype, factors)
    return fast, slow


def _same(a, b) -> None:
    assert a.keys == b.keys and a.bad == b.bad
    assert a.x.dtype == b.x.dtype and a.x.shape == b.x.shape and (a.x == b.x).all()
    for got, want in ((a.labels, b.labels), (a.factors, b.factors)):
        assert (got is None) == (want is None)
        if got is not None:
            assert got.dtype == want.dtype and got.shape == want.shape and (got == want).all()


@pytest.mark.parametrize(
    "overrides,factors",
    [
        (["data.source=digits"], False),
        (["data.source=sprites", "data.size=400"], True),  # uint8 images, labels and factors
        (["data.source=sprites", "data.size=400", "data.binarize=true"], False),
    ],
    ids=["digits", "sprites", "binarized-sprites"],
)
def test_staged_shards_take_the_array_path_and_match_the_per_sample_path(
    tmp_path, overrides, factors
):
    params = params_in(tmp_path, *overrides, "data.shard_size=97")
    shards = stage_shards(StageJob.from_params(params), progress=False).shards_dir
    manifest = read_manifest(shards)
    for split in ("train", "val", "test"):
        for entry in manifest.shards(split):
            fast, slow = _both_paths(
                Path(shards) / entry.name, entry, manifest.shape, manifest.encoding.npy_dtype,
                factors,
            )  # fmt: skip
            assert fast is not None, f"{entry.name} took the per-sample path"
            _same(fast, slow)


def test_labels_of_every_width_and_float_images_take_the_array_path(tmp_path):
    x = _images(40).astype(np.float32) / 7
    labels = np.array([0, 7, 10, 99, 123456789012] * 8)
    samples = [encode_sample(f"k{i:03d}", x[i], label_bytes(labels, i), None) for i in range(40)]
    entry = _written(tmp_path, samples)
    fast, slow = _both_paths(tmp_path / entry.name, entry, SHAPE, "float32", False)
    assert fast is not None
    _same(fast, slow)
    assert fast.labels.tolist() == labels.tolist() and fast.x.tobytes() == x.tobytes()


def _regular(n: int = 6) -> list[tuple[str, bytes]]:
    x = _images(n)
    return [m for i in range(n) for m in ((f"s{i}.npy", _npy(x[i])), (f"s{i}.cls", b"%d" % i))]


IRREGULAR = {
    "members in another order": lambda m: m[:2] + [m[3], m[2]] + m[4:],
    "a label with a space": lambda m: m[:3] + [("s1.cls", b" 1")] + m[4:],
    "a big-endian image": lambda m: m[:2] + [("s1.npy", _npy(_images(2)[1].astype(">u2")))] + m[3:],
    "a Fortran-order image": lambda m: (
        m[:2] + [("s1.npy", _npy(np.asfortranarray(_images(2)[1])))] + m[3:]
    ),
    "a sample without its image": lambda m: m[:2] + m[3:],
    "a sample with an extra member": lambda m: m[:4] + [("s1.txt", b"x")] + m[4:],
    "a key with a dot": lambda m: m[:2] + [("s1.v2.npy", m[2][1]), ("s1.v2.cls", b"1")] + m[4:],
    "a key in a folder": lambda m: [(f"d/{name}", data) for name, data in m],
}


@pytest.mark.parametrize("change", list(IRREGULAR), ids=list(IRREGULAR))
def test_any_other_layout_takes_the_per_sample_path_with_the_same_results(tmp_path, change):
    members = IRREGULAR[change](_regular())
    entry = _tarred(tmp_path, members)
    tar = gzip.decompress((tmp_path / entry.name).read_bytes())
    assert _regular_block(tar, entry.samples, SHAPE, "uint8", False) is None
    block, problem = read_block(str(tmp_path / entry.name), entry, SHAPE, "uint8")
    assert problem is None
    _same(block, _block_of_samples(tar_grouped(tar, "u"), SHAPE, "uint8", False))


def test_bytes_after_an_image_are_left_as_np_load_leaves_them(tmp_path):
    """Only a header followed by exactly the array is taken as every sample's header: with
    bytes after the array, a shorter or longer cut would read other samples shifted."""
    x = _images(6)
    x[:, 0, 0, :] = x[:, 0, 1, 0] = 7  # every first 4 bytes alike: a 4-byte shift would match
    members = [m for i in range(6) for m in ((f"s{i}.npy", _npy(x[i]) + b"tail"),)]
    entry = _tarred(tmp_path, members)
    tar = gzip.decompress((tmp_path / entry.name).read_bytes())
    assert _regular_block(tar, 6, SHAPE, "uint8", False) is None
    block, problem = read_block(str(tmp_path / entry.name), entry, SHAPE, "uint8")
    assert problem is None and not block.bad and (block.x == x).all()


def test_a_bad_sample_is_named_and_the_others_are_kept(tmp_path):
    members = IRREGULAR["a big-endian image"](_regular())  # a uint16 image: not what was staged
    entry = _tarred(tmp_path, members)
    block, problem = read_block(str(tmp_path / entry.name), entry, SHAPE, "uint8")
    assert problem is None and list(block.bad) == [1]
    assert block.bad[1] == "has a bad sample s1 (>u2 (1, 3, 3), manifest says uint8 (1, 3, 3))"
    assert (block.x[0] == _images(6)[0]).all() and (block.x[2:] == _images(6)[2:]).all()


def test_pax_headers_take_the_per_sample_path(tmp_path):
    entry = _tarred(tmp_path, _regular(), fmt=tarfile.PAX_FORMAT)
    block, problem = read_block(str(tmp_path / entry.name), entry, SHAPE, "uint8")
    assert problem is None and block.keys == [f"s{i}" for i in range(6)]
    assert block.labels.tolist() == list(range(6)) and (block.x == _images(6)).all()


@pytest.mark.parametrize(
    "members,samples,why",
    [
        (_regular() + [("s5.npy", b"again")], 6, "is not a readable tar file (s5.npy: duplicate"),
        (_regular(), 5, "holds 6 samples but the manifest says 5"),
        (_regular(), 7, "holds 6 samples but the manifest says 7"),
    ],
    ids=["a repeated member", "more samples than the manifest says", "fewer"],
)
def test_shards_that_disagree_with_their_manifest_are_refused_as_before(
    tmp_path, members, samples, why
):
    entry = _tarred(tmp_path, members).model_copy(update={"samples": samples})
    block, problem = read_block(str(tmp_path / entry.name), entry, SHAPE, "uint8")
    assert block is None and problem.startswith(why), problem
