"""Staging on Ray tasks: 1 process and 3 tasks write byte-identical shards and manifests, for a
fresh staging, an append and an object-store prefix (a real S3 server on 127.0.0.1)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.data.staging import StageJob, stage_shards
from tests.data.conftest import save_array
from tests.data.test_object_store import BUCKET, _objects, s3  # noqa: F401 - the fixture
from tests.helpers.files import file_hashes
from tests.helpers.params import DEFAULTS, params_in

pytestmark = pytest.mark.slow

# Several shards per split, so that the tasks share each split's dealing.
SMALL = ("data.shard_size=90", "cluster.num_workers=1")


def _one_and_three(tmp_path, *sets: str):
    """The same params staged in one process and on three Ray tasks: their results and
    every file's hash in each shards folder."""
    one = stage_shards(StageJob.from_params(params_in(tmp_path / "one", *sets)), progress=False)
    three = stage_shards(
        StageJob.from_params(params_in(tmp_path / "three", *sets, "data.stage_workers=3")),
        progress=False,
    )
    return one, three, file_hashes(one.shards_dir), file_hashes(three.shards_dir)


def test_three_ray_tasks_write_the_same_shards_and_manifest_as_one_process(local_ray, tmp_path):
    one, three, a, b = _one_and_three(tmp_path, *SMALL)
    assert len(a) > 10 and a == b, "every shard and manifest.json, byte for byte"
    assert one.dvc_md5 == three.dvc_md5


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_an_append_on_three_tasks_keeps_old_shards_and_matches_one_process(
    local_ray, tmp_path, dtype
):
    """Float pixels too: their statistics' float sums are taken per shard and added in the
    manifest's order, so the manifest does not depend on which task summed which shard."""
    x = np.random.default_rng(0).random((900, 8, 8)).astype(np.float32)
    if dtype == "uint8":
        x = (x * 255).astype(np.uint8)
    results = {}
    for name, workers in (("one", 1), ("three", 3)):
        work = tmp_path / name
        work.mkdir()
        array = work / "x.npy"
        save_array(array, x[:700])
        sets = [*SMALL, "data.source=array", f"data.path={array}", f"data.stage_workers={workers}"]
        first = stage_shards(StageJob.from_params(params_in(work, *sets)), progress=False)
        before = file_hashes(first.shards_dir)
        save_array(array, x)
        grown = stage_shards(StageJob.from_params(params_in(work, *sets)), progress=False)
        after = file_hashes(grown.shards_dir)
        assert grown.appended
        kept = {k: v for k, v in before.items() if k != "manifest.json"}
        assert all(after[k] == v for k, v in kept.items()), "old shards unchanged"
        results[name] = after
    assert results["one"] == results["three"]


@pytest.mark.usefixtures("local_ray", "s3")
def test_three_tasks_stage_into_an_object_store_prefix_as_one_local_process(tmp_path, small_params):
    url = f"s3://{BUCKET}/parallel"
    remote = stage_shards(
        StageJob.from_params(
            small_params(*SMALL, f"data.shards_dir={url}", "data.stage_workers=3", preset=DEFAULTS)
        ),
        progress=False,
    )
    local = stage_shards(
        StageJob.from_params(small_params(*SMALL, preset=DEFAULTS)), progress=False
    )
    assert remote.dvc_md5 == local.dvc_md5
    objects = _objects("parallel/")
    assert len(objects) == len(file_hashes(local.shards_dir)), "every shard uploaded, once"
    assert not list(tmp_path.glob("**/vae-pipeline-stage-task-*")), "no local leftovers"


def _image_folder(folder):
    from PIL import Image

    rng = np.random.default_rng(3)
    for label in ("cats", "dogs"):
        (folder / label).mkdir(parents=True)
        for i in range(60):
            img = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            Image.fromarray(img).save(folder / label / f"{i:03d}.png")
    return folder


SOURCES = {
    "sprites": ["data.source=sprites", "data.size=700", "data.image_size=[64,64]"],
    "binarized sprites": [
        "data.source=sprites", "data.size=700", "data.image_size=[64,64]", "data.binarize=true",
    ],
    "images": ["data.source=images", "data.image_size=[8,8]", "data.grayscale=true"],
}  # fmt: skip


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("read_cost", [None, 0.0, 50.0])
def test_tasks_reading_only_their_own_samples_write_what_one_process_writes(
    local_ray, tmp_path, monkeypatch, source, read_cost
):
    """Each task reads only the samples of its own shards (sprites and images read those rows
    alone). However the shards are shared out (timed here, or forced to both extremes of the
    read cost), the shards and manifest are those of one process."""
    from pipelines.data import parallel_staging

    if read_cost is not None:  # the driver times it; fixed here to force both extremes
        monkeypatch.setattr(parallel_staging, "_read_cost", lambda src: read_cost)
    sets = [*SMALL, *SOURCES[source]]
    if source == "images":
        sets.append(f"data.path={_image_folder(tmp_path / 'pictures')}")
    _, _, a, b = _one_and_three(tmp_path, *sets)
    assert len(a) > 6 and a == b, "every shard and manifest.json, byte for byte"
