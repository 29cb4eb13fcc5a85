"""Staging: byte-identical shards, stable splits, a complete manifest, atomic replacement."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import yaml

from pipelines.cli import main
from pipelines.data.shards import numbering
from pipelines.data.shards import writer as shard_writer
from pipelines.data.shards.loader import make_loader
from pipelines.data.shards.manifest import read_manifest
from pipelines.data.staging import SPLITS, StageJob, stage_shards
from pipelines.data.versioning.hashing import dvc_dir_md5
from pipelines.errors import PipelineError
from tests.data.conftest import save_array
from tests.helpers.files import file_hashes
from tests.helpers.params import DEFAULTS, REPO, params_in


def keys_by_split(shards_dir) -> dict[str, str]:
    out = {}
    for split, info in read_manifest(shards_dir).model_dump()["splits"].items():
        if info["shards"]:
            for batch in make_loader(shards_dir, split, 64, shuffle=False):
                out.update(dict.fromkeys(batch["key"], split))
    return out


def test_staging_twice_gives_byte_identical_shards_and_manifest(small_params, digits_shards):
    again = stage_shards(StageJob.from_params(small_params(preset=DEFAULTS)), progress=False)
    assert file_hashes(again.shards_dir) == file_hashes(digits_shards)
    assert again.dvc_md5 == dvc_dir_md5(digits_shards)


def test_committed_data_dvc_records_the_regenerated_digits_shards(digits_shards):
    """A fresh clone without remote access regenerates exactly what data.dvc records."""
    out = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    assert out["path"] == "data/shards"
    assert dvc_dir_md5(digits_shards) == out["md5"]
    files = [p for p in digits_shards.iterdir() if p.is_file()]
    assert len(files) == out["nfiles"] and sum(p.stat().st_size for p in files) == out["size"]


def test_adding_samples_never_moves_old_samples_between_splits(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (450, 4, 4), dtype=np.uint8)
    first = stage_shards(
        StageJob.from_params(
            params_in(
                tmp_path / "a",
                "data.source=array",
                f"data.path={save_array(tmp_path / 'a.npy', x[:300])}",
            )
        ),
        progress=False,
    )
    grown = stage_shards(
        StageJob.from_params(
            params_in(
                tmp_path / "b",
                "data.source=array",
                f"data.path={save_array(tmp_path / 'b.npy', x)}",
            )
        ),
        progress=False,
    )
    before, after = keys_by_split(first.shards_dir), keys_by_split(grown.shards_dir)
    assert len(before) == 300 and len(after) == 450
    assert all(after[key] == split for key, split in before.items())
    assert {after[k] for k in after.keys() - before.keys()} == set(SPLITS)


def test_manifest_lists_every_shard_with_counts_hashes_shape_source_and_normalisation(
    digits_shards,
):
    m = read_manifest(digits_shards).model_dump()
    # digits are the integers 0..16: stored as uint8, scaled by the loader (x/16).
    assert m["sample"]["shape"] == [1, 8, 8] and m["sample"]["dtype"] == "uint8"
    assert m["encoding"] == {"shards": "tar.gz", "npy_dtype": "uint8", "divide_by": 16.0}
    assert m["source"]["name"] == "digits" and m["source"]["version"].startswith("sha256:")
    assert m["normalisation"]["scaling"] == "x/16" and m["normalisation"]["range"] == [0.0, 1.0]
    assert 0 < m["normalisation"]["train_mean_per_channel"][0] < 1
    assert sum(m["splits"][s]["samples"] for s in SPLITS) == 1797
    on_disk = sorted(p.name for p in digits_shards.glob("*.tar.gz"))
    listed = sorted(e["name"] for s in SPLITS for e in m["splits"][s]["shards"])
    assert on_disk == listed
    for split in SPLITS:
        entries = m["splits"][split]["shards"]
        assert len(entries) >= 2  # params.yaml: 2 DDP ranks
        assert sum(e["samples"] for e in entries) == m["splits"][split]["samples"]
        for e in entries:
            data = (digits_shards / e["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == e["sha256"] and len(data) == e["bytes"]


def test_each_sample_holds_key_native_uint8_chw_image_and_label(digits_shards):
    from sklearn.datasets import load_digits

    digits = load_digits()
    with tarfile.open(digits_shards / "val-000000.tar.gz") as tar:
        members = tar.getmembers()
        assert {m.mtime for m in members} == {0}
        first = members[0].name.split(".")[0]
        files = {m.name: tar.extractfile(m).read() for m in members if m.name.startswith(first)}
    index = int(first.removeprefix("digits-"))
    x = np.load(io.BytesIO(files[f"{first}.npy"]))
    assert x.dtype == np.uint8 and x.shape == (1, 8, 8)
    np.testing.assert_array_equal(x[0], digits.images[index])
    assert int(files[f"{first}.cls"]) == digits.target[index]


def test_failed_staging_keeps_old_shards_and_leaves_no_temp_folders(
    tmp_path, monkeypatch, small_params
):
    good = stage_shards(StageJob.from_params(small_params(preset=DEFAULTS)), progress=False)
    before = file_hashes(good.shards_dir)

    bad = np.full((50, 4, 4), 0.5)
    bad[7] = np.nan
    path = save_array(tmp_path / "bad.npy", bad)
    with pytest.raises(PipelineError, match="array-0000007"):
        stage_shards(
            StageJob.from_params(
                small_params("data.source=array", f"data.path={path}", preset=DEFAULTS)
            ),
            progress=False,
        )

    calls = {"n": 0}
    real = shard_writer._npy_bytes

    def fail_midway(x):
        calls["n"] += 1
        if calls["n"] > 500:
            raise OSError("disk full")
        return real(x)

    monkeypatch.setattr(shard_writer, "_npy_bytes", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        stage_shards(
            StageJob.from_params(small_params(preset=DEFAULTS)), progress=False, rebuild=True
        )
    assert file_hashes(good.shards_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npy", "shards"]


def test_small_splits_are_cut_into_enough_shards_for_ranks_times_workers(small_params):
    params = small_params("cluster.num_workers=2", "cluster.loader_workers=2", preset=DEFAULTS)
    result = stage_shards(StageJob.from_params(params), progress=False)
    assert min(result.shards.values()) >= 4
    assert make_loader(result.shards_dir, "val", 16, rank=1, world_size=2, num_workers=2)


def test_too_few_samples_for_the_required_shards_is_a_clear_error(tmp_path, small_params):
    path = save_array(tmp_path / "tiny.npy", np.zeros((6, 4, 4), np.uint8))
    params = small_params("data.source=array", f"data.path={path}", preset=DEFAULTS)
    with pytest.raises(PipelineError, match="fewer than the 2 shards") as exc:
        stage_shards(StageJob.from_params(params), progress=False)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "shards").exists()


def test_stage_command_prints_the_result_as_json_and_records_a_portable_summary(tmp_path, capsys):
    record = tmp_path / "stage.json"
    code = main(
        [
            "stage", "--json", "--quiet", "--params", str(REPO / "params.yaml"),
            "--set", f"data.shards_dir={tmp_path / 'shards'}", "--record", str(record),
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip())
    assert result["shards_dir"] == str(tmp_path / "shards")
    assert result["samples"]["train"] + result["samples"]["val"] + result["samples"]["test"] == 1797
    assert result["shards"]["train"] >= 2 and result["dvc_md5"].endswith(".dir")
    summary = json.loads(record.read_text())
    assert summary["shards_dir"] == str(tmp_path / "shards")  # as configured (absolute here)
    assert "manifest" not in summary and summary["dvc_md5"] == result["dvc_md5"]


def test_stage_command_reports_bad_input_as_one_line_with_exit_code_2(tmp_path, capsys):
    path = save_array(tmp_path / "s.npy", np.array(["a", "b"]))
    code = main(
        [
            "stage", "--quiet", "--params", str(REPO / "params.yaml"),
            "--set", "data.source=array", "--set", f"data.path={path}",
            "--set", f"data.shards_dir={tmp_path / 'shards'}",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and str(path) in err


def test_sprites_stage_with_their_factors_and_a_larger_size_appends(small_params):
    from pipelines.data.sources import sprites

    small = stage_shards(
        StageJob.from_params(small_params("data.source=sprites", "data.size=300", preset=DEFAULTS)),
        progress=False,
    )
    m = read_manifest(small.shards_dir).model_dump()
    assert m["sample"]["shape"] == [1, 64, 64] and m["encoding"]["divide_by"] == 255.0
    assert m["factors"] == {
        "names": list(sprites.FACTOR_NAMES),
        "sizes": list(sprites.FACTOR_SIZES),
    }
    name = m["splits"]["val"]["shards"][0]["name"]
    with tarfile.open(small.shards_dir / name) as tar:
        files = {mem.name: tar.extractfile(mem).read() for mem in tar.getmembers()}
    key = sorted(files)[0].split(".")[0]
    index = int(key.removeprefix("sprites-"))
    factors = np.load(io.BytesIO(files[f"{key}.factors.npy"]))
    np.testing.assert_array_equal(factors, sprites.factors_of(np.array([index]))[0])
    assert int(files[f"{key}.cls"]) == factors[0]  # the label is the shape
    image = np.load(io.BytesIO(files[f"{key}.npy"]))
    np.testing.assert_array_equal(image[0], sprites.render(np.array([index]))[0])

    grown = stage_shards(
        StageJob.from_params(small_params("data.source=sprites", "data.size=330", preset=DEFAULTS)),
        progress=False,
    )
    assert grown.appended and sum(grown.samples.values()) == 330


def test_new_shard_numbers_never_take_a_name_and_wrap_before_six_digits_run_out():
    """A prefix rebuilt every night numbers each generation past the last one, so the numbers
    climb; before they would need a seventh digit (which readers refuse), the lowest free run
    long enough is used instead, and never a number in use."""
    first_free = numbering.first_free
    names = ["train-000000.tar.gz", "train-000001.tar.gz", "val-000004.tar.gz", "test-000002.tar"]
    assert first_free(names, {"train": 3, "val": 1, "test": 1}) == {"train": 2, "val": 5, "test": 3}
    assert first_free([], {"train": 9, "val": 9, "test": 9}) == dict.fromkeys(SPLITS, 0)
    top = numbering.SHARD_NUMBERS
    high = [f"train-{n:06d}.tar.gz" for n in range(top - 5, top)]
    assert first_free(high, {"train": 5, "val": 0, "test": 0})["train"] == 0
    # Numbers 0-2 and 9 in use, near the top too: the first run of 4 free ones starts at 3.
    crowded = [f"train-{n:06d}.tar.gz" for n in (0, 1, 2, 9, top - 1)]
    assert first_free(crowded, {"train": 4, "val": 0, "test": 0})["train"] == 3
    assert first_free(crowded, {"train": 7, "val": 0, "test": 0})["train"] == 10
    with pytest.raises(PipelineError, match="free train shard numbers"):
        first_free(crowded, {"train": top, "val": 0, "test": 0})


def test_shards_an_earlier_version_staged_are_written_once_more_then_appended_to(tmp_path, caplog):
    """A manifest without this version's content scheme (one running digest over every
    sample, which only one process could compute) cannot be checked shard by shard: its next
    staging writes every shard again, as a fresh staging would, and says so once; the one
    after that appends."""
    x = np.random.default_rng(0).integers(0, 256, (450, 4, 4), dtype=np.uint8)
    array = save_array(tmp_path / "x.npy", x[:300])
    params = params_in(tmp_path / "work", "data.source=array", f"data.path={array}")
    first = stage_shards(StageJob.from_params(params), progress=False)
    manifest = json.loads(first.manifest.read_text())
    assert manifest["content"]["scheme"] == 2
    del manifest["content"]["scheme"]  # as an earlier version wrote it
    first.manifest.write_text(json.dumps(manifest))
    save_array(array, x)
    with caplog.at_level("INFO", logger="pipelines.data.staging"):
        rebuilt = stage_shards(StageJob.from_params(params), progress=False)
    assert not rebuilt.appended
    assert any("staged by an earlier version" in r.getMessage() for r in caplog.records)
    fresh = stage_shards(
        StageJob.from_params(params_in(tmp_path / "fresh", "data.source=array",
                                       f"data.path={array}")),
        progress=False,
    )  # fmt: skip
    assert file_hashes(rebuilt.shards_dir) == file_hashes(fresh.shards_dir)
    save_array(array, np.concatenate([x, x[:50] // 2]))
    assert stage_shards(StageJob.from_params(params), progress=False).appended
