"""Lineage records in MLflow (dataset inputs, test metrics on logged models): what they name,
and that a tracking store refusing them costs the record, never the stage."""

from __future__ import annotations

import json
import logging

import mlflow
import pytest

from pipelines import tracking
from pipelines.data.shards.format import FORMAT
from pipelines.data.shards.manifest import Manifest

MANIFEST = Manifest.model_validate({
    "format": FORMAT,
    "source": {"name": "digits", "version": "sha256:" + "c" * 64},
    "sample": {"shape": [1, 8, 8], "dtype": "uint8"},
    "encoding": {"shards": "tar.gz", "npy_dtype": "uint8", "divide_by": 16.0},
    "split": {"val_fraction": 0.1, "test_fraction": 0.1},
    "splits": {
        s: {"samples": 10, "shards": [
            {"name": f"{s}-000000.tar.gz", "samples": 10, "bytes": 1, "sha256": "d" * 64}
        ]} for s in tracking.CONTEXTS
    },
})  # fmt: skip
VERSION = {"manifest_sha256": "a" * 64, "dvc_md5": "0123456789abcdef0123456789abcdef.dir"}


@pytest.fixture
def deleted_run(tmp_path) -> tuple[mlflow.MlflowClient, str]:
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("lineage", (tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.delete_run(run_id)  # MLflow refuses every write to it
    return client, run_id


def test_each_split_is_one_dataset_input_digested_by_the_dvc_md5():
    inputs = tracking.shard_inputs(MANIFEST, VERSION, "/data/shards", {"dvc_file": "data.dvc"})
    contexts = [{t.key: t.value for t in i.tags}["mlflow.data.context"] for i in inputs]
    assert contexts == ["training", "validation", "test"]
    assert [i.dataset.name for i in inputs] == [
        f"digits-shards-{s}" for s in ("train", "val", "test")
    ]
    assert {i.dataset.digest for i in inputs} == {VERSION["dvc_md5"]}
    assert {(i.dataset.source_type, i.dataset.source) for i in inputs} == {
        ("local", json.dumps({"uri": "/data/shards"}))
    }
    assert json.loads(inputs[2].dataset.profile)["dvc_file"] == "data.dvc"


def test_object_store_shards_and_dvc_remote_are_logged_without_credentials():
    url = "s3://user:secret@bucket/shards"
    remote = {"dvc_remote": "https://user:secret@dvc.example.com/store"}
    (first, *_) = tracking.shard_inputs(MANIFEST, VERSION, url, remote)
    assert first.dataset.source_type == "s3"
    assert json.loads(first.dataset.source)["uri"] == "s3://***@bucket/shards"
    assert json.loads(first.dataset.profile)["dvc_remote"] == "https://***@dvc.example.com/store"


def test_without_a_dvc_md5_the_digest_is_the_manifest_hash_cut_to_mlflows_limit():
    ref = tracking.data_ref(MANIFEST, {"manifest_sha256": "b" * 64, "dvc_md5": None}, "test")
    assert ref == tracking.DataRef("digits-shards-test", "b" * 36)


def test_a_store_refusing_the_lineage_records_warns_and_the_stage_goes_on(deleted_run, caplog):
    client, run_id = deleted_run
    with caplog.at_level(logging.WARNING, logger="vae_pipeline.tracking"):
        tracking.log_data_inputs(client, run_id, tracking.shard_inputs(MANIFEST, VERSION, "/d", {}))
        ref = tracking.data_ref(MANIFEST, VERSION, "test")
        tracking.log_model_metrics(client, run_id, ["m-0"], {"test_neg_elbo": 1.0}, ref)
    warnings = [r.getMessage() for r in caplog.records]
    assert any("dataset inputs" in w for w in warnings)
    assert any("test metrics" in w for w in warnings)
