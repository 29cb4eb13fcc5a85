"""The shard loader: equal batch counts across ranks, exact evaluation, corrupt shards, memory."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.data.shards.assignment import assign_shards, batches_per_epoch
from pipelines.data.shards.loader import make_loader, shard_batches
from pipelines.data.shards.manifest import ShardEntry, read_manifest
from pipelines.data.sources import sprites
from pipelines.data.staging import StageJob, stage_shards
from pipelines.errors import PipelineError
from tests.data.conftest import save_array, uneven_params
from tests.helpers.params import DEFAULTS, REPO, params_in
from tests.servers import free_port

N_UNEVEN = 190


def keys_of(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def corrupted_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_uneven_fixture_has_an_odd_number_of_unequal_shards(uneven_shards):
    counts = [e.samples for e in read_manifest(uneven_shards).shards("train")]
    assert counts == [40, 40, 40, 40, 30]
    assert [sum(counts[i] for i in p) for p in assign_shards(counts, 2)] == [110, 80]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_rank_gets_same_batch_count_with_uneven_shards(uneven_shards, num_workers):
    manifest = read_manifest(uneven_shards)
    expected = batches_per_epoch([e.samples for e in manifest.shards("train")], 16, world_size=2)
    seen, counts = set(), []
    for rank in range(2):
        loader = make_loader(
            uneven_shards, "train", 16, rank=rank, world_size=2, num_workers=num_workers, epoch=3
        )
        batches = list(loader)
        counts.append(len(batches))
        assert len(loader) == len(batches)
        assert all(b["x"].shape[1:] == (1, 4, 4) and b["x"].dtype == torch.float32 for b in batches)
        assert all(len(b["label"]) == len(b["key"]) for b in batches)
        seen.update(keys_of(batches))
    assert counts == [expected, expected] == [7, 7]
    assert len(seen) == N_UNEVEN  # the union covers every sample


def test_evaluation_mode_yields_every_sample_exactly_once(uneven_shards, digits_shards):
    keys = keys_of(make_loader(uneven_shards, "train", 16, shuffle=False))
    assert len(keys) == len(set(keys)) == N_UNEVEN
    test = read_manifest(digits_shards).split_of("test").samples
    for workers in (0, 2):
        loader = make_loader(digits_shards, "test", 100, shuffle=False, num_workers=workers)
        batches = list(loader)
        keys = keys_of(batches)
        assert len(keys) == len(set(keys)) == test
        assert [len(b["key"]) for b in batches][:-1] == [100] * (len(batches) - 1)
    # In order: a second pass gives the same sequence.
    assert keys_of(make_loader(digits_shards, "test", 100, shuffle=False)) == keys_of(
        make_loader(digits_shards, "test", 100, shuffle=False)
    )


def test_without_equalising_each_sample_goes_to_exactly_one_rank(uneven_shards):
    keys = []
    for rank in range(2):
        keys += keys_of(
            make_loader(uneven_shards, "train", 16, rank=rank, world_size=2, equalize=False)
        )
    assert len(keys) == len(set(keys)) == N_UNEVEN


def test_shuffle_is_seeded_per_epoch(uneven_shards):
    def order(epoch, seed=0):
        return keys_of(
            make_loader(uneven_shards, "train", 16, epoch=epoch, seed=seed, shuffle_buffer=50)
        )

    assert order(1) == order(1)
    assert order(1) != order(2) and order(1) != order(1, seed=5)
    assert sorted(order(1)) == sorted(order(2))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_carry_each_samples_own_factors_when_asked(small_params, num_workers):
    """What MIG in evaluate reads instead of a second pass over the shards: every batch's
    factors are its keys' own (from the grid index in the key, not from the shards), also
    where batches are re-cut across loader workers' chunks (7 divides no shard)."""
    params = small_params(
        "data.source=sprites", "data.size=300", "data.test_fraction=0.5", preset=DEFAULTS
    )
    shards = stage_shards(StageJob.from_params(params), progress=False).shards_dir
    loader = make_loader(
        shards, "test", 7, shuffle=False, equalize=False, num_workers=num_workers, factors=True
    )
    batches = list(loader)
    keys = keys_of(batches)
    assert len(keys) == read_manifest(shards).split_of("test").samples
    for b in batches:
        grid = np.array([int(k.rsplit("-", 1)[1]) for k in b["key"]])
        assert np.array_equal(b["factors"], sprites.factors_of(grid))
    assert all(b["factors"] is None for b in make_loader(shards, "test", 7, shuffle=False))


def test_asking_for_factors_of_shards_without_them_names_the_sample(digits_shards):
    with pytest.raises(PipelineError, match=r"has a bad sample digits-\d+ \('factors.npy'\)"):
        list(make_loader(digits_shards, "test", 100, shuffle=False, factors=True))


def test_truncated_shard_raises_error_naming_the_shard(uneven_shards, tmp_path):
    shards = corrupted_copy(uneven_shards, tmp_path / "shards")
    victim = shards / "train-000002.tar.gz"
    size = victim.stat().st_size
    victim.write_bytes(victim.read_bytes()[: size // 2])
    with pytest.raises(PipelineError) as exc:
        list(make_loader(shards, "train", 16))
    msg = str(exc.value)
    assert "\n" not in msg and str(victim) in msg
    assert (
        f"truncated at byte {size // 2}" in msg
        and "vae-pipeline stage" in msg
        and "dvc pull" in msg
    )


def test_flipped_byte_or_missing_shard_raises_error_naming_the_shard(uneven_shards, tmp_path):
    shards = corrupted_copy(uneven_shards, tmp_path / "shards")
    victim = shards / "train-000001.tar.gz"
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match="SHA-256") as exc:
        list(make_loader(shards, "train", 16, num_workers=2))
    assert str(victim) in str(exc.value) and "\n" not in str(exc.value)
    victim.unlink()
    with pytest.raises(PipelineError, match="is missing") as exc:
        list(make_loader(shards, "train", 16))
    assert str(victim) in str(exc.value)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_policy_skips_counts_and_reports_the_corrupt_shard(
    uneven_shards, tmp_path, caplog, num_workers
):
    shards = corrupted_copy(uneven_shards, tmp_path / "shards")
    victim = shards / "train-000004.tar.gz"  # the 30-sample shard, on rank 0
    victim.write_bytes(victim.read_bytes()[:1000])
    counts = []
    with caplog.at_level(logging.WARNING, logger="pipelines.data.shards.loader"):
        for rank in range(2):
            loader = make_loader(
                shards, "train", 16, rank=rank, world_size=2, num_workers=num_workers,
                on_corrupt="skip",
            )  # fmt: skip
            keys = keys_of(loader)
            counts.append(len(keys) // 16)
            expected = [str(victim)] if rank == 0 else []
            assert loader.skipped == expected
    assert counts == [7, 7]  # still equal: rank 0 fills from another pass
    assert str(victim) in caplog.text and "1 corrupt shard(s) skipped" in caplog.text


def test_skip_policy_with_every_shard_corrupt_is_an_error_not_an_empty_epoch(
    uneven_shards, tmp_path
):
    shards = corrupted_copy(uneven_shards, tmp_path / "shards")
    for tar in shards.glob("*.tar.gz"):
        tar.write_bytes(b"")
    with pytest.raises(PipelineError, match="read no samples.*5 skipped as corrupt"):
        list(make_loader(shards, "train", 16, on_corrupt="skip"))


def test_too_few_shards_for_ranks_times_workers_is_a_clear_error(uneven_shards):
    with pytest.raises(PipelineError, match="min_shards_per_split >= 8") as exc:
        make_loader(uneven_shards, "train", 16, rank=0, world_size=2, num_workers=4)
    assert "\n" not in str(exc.value)


def test_missing_shards_folder_says_to_stage_or_pull(tmp_path):
    with pytest.raises(PipelineError, match="run 'vae-pipeline stage' or 'dvc pull' first"):
        make_loader(tmp_path / "nothing", "train", 16)


def _peak_bytes_reading(shards_dir: Path, shuffle_buffer: int) -> int:
    tracemalloc.start()
    try:
        for batch in make_loader(shards_dir, "train", 32, shuffle_buffer=shuffle_buffer):
            del batch
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_flat_as_the_dataset_grows(tmp_path):
    streaming, buffering_all = [], []
    for n in (1000, 5000):
        x = np.random.default_rng(n).integers(0, 256, (n, 16, 16), dtype=np.uint8)
        params = params_in(
            tmp_path / str(n), "data.source=array", f"data.path={save_array(tmp_path / f'{n}.npy', x)}",
            "data.shard_size=100", "data.val_fraction=0", "data.test_fraction=0",
        )  # fmt: skip
        shards = stage_shards(StageJob.from_params(params), progress=False).shards_dir
        streaming.append(_peak_bytes_reading(shards, shuffle_buffer=100))
        buffering_all.append(_peak_bytes_reading(shards, shuffle_buffer=10**9))
    # The probe sees samples held in memory: a buffer holding the whole split grows with it...
    assert buffering_all[1] - buffering_all[0] > 4000 * 16 * 16, buffering_all  # 4,000 more images
    # ...while streaming (one shard + a bounded shuffle buffer) stays put.
    assert streaming[1] < 1.3 * streaming[0] + 256 * 1024, streaming


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from datetime import timedelta
    import torch, torch.distributed as dist
    from pipelines.data.shards.loader import make_loader, shard_batches

    rank, port, shards, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=timedelta(seconds=30),
    )
    steps, keys = 0, []
    for batch in make_loader(shards, "train", 16, rank=rank, world_size=2, epoch=1):
        n = torch.tensor([float(len(batch["key"]))])
        dist.all_reduce(n)  # a collective per step, like DDP's gradient all-reduce
        steps, keys = steps + 1, keys + batch["key"]
    dist.barrier()
    json.dump({"steps": steps, "keys": keys}, open(out, "w"))
    dist.destroy_process_group()
    """
)


def test_two_ddp_ranks_with_uneven_shards_finish_the_epoch_together(uneven_shards, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    port = free_port()
    env = {**os.environ, "WORLD_SIZE": "2", "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(r),
                str(port),
                str(uneven_shards),
                str(tmp_path / f"{r}.json"),
            ],
            env={**env, "RANK": str(r)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    try:
        errors = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], errors
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert results[0]["steps"] == results[1]["steps"] == 7
    assert len(set(results[0]["keys"]) | set(results[1]["keys"])) == N_UNEVEN


def test_uneven_params_helper_stages_five_shards(tmp_path):
    """Guards the fixture's assumption if params.yaml defaults change."""
    result = stage_shards(StageJob.from_params(uneven_params(tmp_path)), progress=False)
    assert result.shards == {"train": 5, "val": 0, "test": 0}


def test_hand_written_tar_reader_agrees_with_tarfile(digits_shards, uneven_shards):
    """The fast ustar reader (3x tarfile's speed in benchmarks/loader_throughput.py) and its
    grouping must give exactly what the standard library and WebDataset give, member for
    member and sample for sample."""
    import gzip
    import io

    from webdataset.tariterators import group_by_keys, tar_file_expander

    from pipelines.data.shards.reader import _plain_tar_members, tar_grouped

    for folder in (digits_shards, uneven_shards):
        for shard in sorted(folder.glob("*.tar.gz")):
            raw = shard.read_bytes()
            data = gzip.decompress(raw)
            ours = _plain_tar_members(data)
            stream = [{"url": str(shard), "stream": io.BytesIO(data)}]
            theirs = [m for m in tar_file_expander(stream) if m]  # {} ends a shard there
            assert ours is not None, f"{shard.name}: staged shards take the fast path"
            assert ours == [(m["fname"], m["data"]) for m in theirs]
            assert tar_grouped(data, str(shard)) == list(group_by_keys(iter(theirs)))


def test_a_window_of_a_shards_batches_is_exactly_those_batches_of_the_whole(digits_shards):
    """What a scoring piece reads: batches [first, stop) of the shard, decoded alone."""
    manifest = read_manifest(digits_shards)
    entry = manifest.shards("train")[0]
    url = str(digits_shards / entry.name)
    whole = list(shard_batches(url, entry, manifest, 16))
    for window, want in [((2, 5), whole[2:5]), ((0, 1), whole[:1]), ((3, None), whole[3:])]:
        part = list(shard_batches(url, entry, manifest, 16, batches=window))
        assert [b["key"] for b in part] == [b["key"] for b in want], window
        assert all(torch.equal(a["x"], b["x"]) for a, b in zip(part, want, strict=True))
    assert list(shard_batches(url, entry, manifest, 16, batches=(len(whole), None))) == []


def test_fast_grouping_splits_names_as_webdataset_does():
    """Keys and extensions as WebDataset's base_plus_ext gives them, odd names included, and
    a repeated member is refused as group_by_keys refuses it."""
    from webdataset.tariterators import base_plus_ext

    from pipelines.data.shards.reader import _grouped, _key_and_ext

    for name in ["k1.npy", "a/b.c/d.NPY", "a.b.c", "a/.hidden", ".npy", "noext", "d/k.x.y"]:
        assert _key_and_ext(name) == base_plus_ext(name), name
    samples = _grouped([("k1.npy", b"x"), ("k1.CLS", b"3"), ("k2.npy", b"y")], "u")
    assert samples == [
        {"__key__": "k1", "__url__": "u", "npy": b"x", "cls": b"3"},
        {"__key__": "k2", "__url__": "u", "npy": b"y"},
    ]
    with pytest.raises(ValueError, match="duplicate"):
        _grouped([("k1.npy", b"x"), ("k1.npy", b"y")], "u")


@pytest.mark.parametrize(
    "members,why",
    [
        ({"k1.cls": b"3"}, r"\('npy'\)"),
        ({"k1.npy": "2x2"}, r"\(uint8 \(2, 2\), manifest says uint8 \(1, 4, 4\)\)"),
    ],
)
def test_embeds_shard_reader_refuses_a_bad_sample_of_a_whole_shard_as_the_loader_does(
    tmp_path, members, why
):
    """embed's Ray tasks read shards with the loader's checks: a shard whose bytes match the
    manifest but holds a sample without an image, or of another shape, is one line naming it."""
    import gzip
    import hashlib
    import io
    import tarfile

    from pipelines.jobs.embed_sources import _shard_samples

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in members.items():
            if data == "2x2":
                buf = io.BytesIO()
                np.save(buf, np.zeros((2, 2), np.uint8))
                data = buf.getvalue()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shard = gzip.compress(raw.getvalue())
    (tmp_path / "train-000000.tar.gz").write_bytes(shard)
    entry = ShardEntry(name="train-000000.tar.gz", bytes=len(shard), samples=1,
                       sha256=hashlib.sha256(shard).hexdigest())  # fmt: skip
    with pytest.raises(PipelineError, match=rf"train-000000.tar.gz has a bad sample k1 {why}"):
        _shard_samples(
            {"name": np.array([entry.name])}, str(tmp_path), {entry.name: entry},
            {"shape": [1, 4, 4], "dtype": "uint8"},
        )  # fmt: skip
