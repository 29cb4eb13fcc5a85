"""Shards on object storage, against a real S3-compatible server on 127.0.0.1 (moto's
standalone server): staging into s3://, training, evaluation, registration and embedding from
it, incremental uploads, DVC with the same server as its remote, and the failures a user meets
(an unreachable store, a missing bucket, a shard deleted from the bucket, foreign objects)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.data.shards.format import SPLITS
from pipelines.data.shards.loader import make_loader
from pipelines.data.shards.manifest import read_manifest
from pipelines.data.shards.reader import verify_shards
from pipelines.data.staging import StageJob, stage_shards
from pipelines.data.versioning.dvc import check_push_remote, default_remote_url
from pipelines.errors import PipelineError
from pipelines.evaluation.evaluate import EvaluateJob
from pipelines.registry.register import RegisterJob
from pipelines.training.job import TrainJob
from tests.helpers.files import file_hashes
from tests.helpers.params import DEFAULTS, REPO, params_in
from tests.servers import free_port, s3_server

pytestmark = pytest.mark.slow

BUCKET = "vae-data"
SERVER_LOG: list[Path] = []  # the module server's request log, one line per request


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server's endpoint, with this process's AWS_* settings pointing at it."""
    import boto3
    import s3fs

    workdir = tmp_path_factory.mktemp("s3")
    SERVER_LOG[:] = [workdir / "s3-server.log"]
    with s3_server(workdir) as endpoint:
        env = {
            "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        }  # fmt: skip
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        # fsspec keeps one S3FileSystem per set of arguments, and its client read the endpoint
        # from the environment when made: a module run after another would reach the dead
        # server of the first.
        s3fs.S3FileSystem.clear_instance_cache()
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        try:
            yield endpoint
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _objects(prefix: str) -> dict[str, str]:
    """Key -> ETag of everything under the prefix (an ETag changes when an object is rewritten)."""
    import boto3

    listed = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"]: o["ETag"] for o in listed}


def _keys(shards, split: str) -> list[str]:
    return [
        k for b in make_loader(shards, split, 256, shuffle=False, equalize=False) for k in b["key"]
    ]


def test_stage_to_s3_reads_back_like_local_and_appends_only_new_objects(s3, tmp_path, small_params):
    url = f"s3://{BUCKET}/digits"
    remote = stage_shards(
        StageJob.from_params(small_params(f"data.shards_dir={url}", preset=DEFAULTS)),
        progress=False,
    )
    local = stage_shards(StageJob.from_params(small_params(preset=DEFAULTS)), progress=False)
    assert remote.dvc_md5 == local.dvc_md5, "the same bytes, wherever they are"
    assert read_manifest(url) == read_manifest(local.shards_dir)
    verify_shards(url, ["train", "val", "test"])
    for split in ("train", "test"):
        assert _keys(url, split) == _keys(local.shards_dir, split)

    array = tmp_path / "x.npy"
    x = (np.random.default_rng(0).random((700, 8, 8)) * 255).astype(np.uint8)
    np.save(array, x[:600])
    sets = [f"data.shards_dir=s3://{BUCKET}/grow", "data.source=array", f"data.path={array}"]
    stage_shards(StageJob.from_params(small_params(*sets, preset=DEFAULTS)), progress=False)
    before = _objects("grow/")
    np.save(array, x)
    grown = stage_shards(StageJob.from_params(small_params(*sets, preset=DEFAULTS)), progress=False)
    after = _objects("grow/")
    assert grown.appended
    kept = {k: e for k, e in before.items() if not k.endswith("manifest.json")}
    assert all(after[k] == e for k, e in kept.items()), "old shards were not uploaded again"
    assert len(after) > len(before)


def test_staging_to_the_store_keeps_only_the_open_shards_on_local_disk(
    s3, small_params, monkeypatch
):
    """At 10^7 images the new shards need not fit the staging machine's temporary disk: each is
    uploaded as soon as it is written and removed there, so the local folder never holds more
    than the shards open at once (MAX_OPEN per split), and the prefix gets what a local staging
    of the same settings writes."""
    from pipelines.data import staging
    from pipelines.data.shards.writer import SplitWriter

    monkeypatch.setattr(SplitWriter, "MAX_OPEN", 2)
    real, on_disk = staging.storage.upload, []

    def counting(local: Path, dest) -> None:
        on_disk.append(len(list(Path(local).parent.glob("*.tar.gz"))))
        real(local, dest)

    monkeypatch.setattr(staging.storage, "upload", counting)
    url = f"s3://{BUCKET}/bounded"
    remote = stage_shards(
        StageJob.from_params(
            small_params(f"data.shards_dir={url}", "data.shard_size=30", preset=DEFAULTS)
        )
    )
    local = stage_shards(
        StageJob.from_params(small_params("data.shard_size=30", preset=DEFAULTS)), progress=False
    )
    shards = sum(remote.shards.values())
    assert shards > 40 and len(on_disk) == shards + 1, "every shard, then the manifest"
    assert max(on_disk) <= 3 * 2, f"{max(on_disk)} shards waited on local disk at once"
    assert remote.dvc_md5 == local.dvc_md5 and read_manifest(url) == read_manifest(local.shards_dir)


def test_a_rebuild_whose_upload_fails_leaves_the_previous_version_whole(
    s3, small_params, monkeypatch
):
    """Re-staging a prefix with other settings writes every shard anew. The store has no
    rename: the new shards go under names no object has, the manifest last, so an upload cut
    off half-way leaves the old version readable byte for byte (readers go by the manifest);
    the next staging that finishes removes the leftovers."""
    from pipelines.data import staging

    url = f"s3://{BUCKET}/rebuild"
    stage_shards(
        StageJob.from_params(small_params(f"data.shards_dir={url}", preset=DEFAULTS)),
        progress=False,
    )
    before, keys = read_manifest(url), _keys(url, "train")
    real, uploaded = staging.storage.upload, []

    def cut_off(local: Path, dest) -> None:
        if uploaded:
            raise ConnectionResetError("connection reset by peer")
        uploaded.append(dest.name)
        real(local, dest)

    monkeypatch.setattr(staging.storage, "upload", cut_off)
    other = small_params(f"data.shards_dir={url}", "data.test_fraction=0.3", preset=DEFAULTS)
    with pytest.raises(PipelineError, match="did not answer"):
        stage_shards(StageJob.from_params(other), progress=False)
    assert uploaded, "a new shard reached the store before the cut"
    assert read_manifest(url) == before
    verify_shards(url, ["train", "val", "test"])
    assert _keys(url, "train") == keys, "every listed shard still matches its SHA-256"

    monkeypatch.setattr(staging.storage, "upload", real)
    stage_shards(StageJob.from_params(other), progress=False)
    manifest = read_manifest(url)
    assert manifest.splits.test.samples > before.splits.test.samples
    listed = {e.name for s in SPLITS for e in manifest.shards(s)}
    assert set(_objects("rebuild/")) == {f"rebuild/{n}" for n in [*listed, "manifest.json"]}
    verify_shards(url, ["train", "val", "test"])
    _keys(url, "test")  # reads back, hashes checked


def test_objects_named_like_shards_that_no_manifest_of_ours_lists_are_never_deleted(
    s3, small_params
):
    """Ownership, not naming: a prefix of someone else's train-00000N.tar objects, or our
    staged prefix plus one stranger named like a shard, is refused in one line and every
    object stays as it was."""
    import boto3

    client = boto3.client("s3")
    for key in ("foreign/train-000001.tar", "foreign/train-000002.tar", "foreign/val-000001.tar"):
        client.put_object(Bucket=BUCKET, Key=key, Body=b"not ours")
    url = f"s3://{BUCKET}/ours"
    stage_shards(
        StageJob.from_params(small_params(f"data.shards_dir={url}", preset=DEFAULTS)),
        progress=False,
    )
    client.put_object(Bucket=BUCKET, Key="ours/train-000099.tar.gz", Body=b"a stranger")
    for prefix, named in (("foreign", "train-00000"), ("ours", "train-000099.tar.gz")):
        before = _objects(f"{prefix}/")
        with pytest.raises(PipelineError) as err:
            stage_shards(
                StageJob.from_params(
                    small_params(f"data.shards_dir=s3://{BUCKET}/{prefix}", preset=DEFAULTS)
                ),
                progress=False,
            )
        assert named in str(err.value) and "did not write" in str(err.value)
        assert "\n" not in str(err.value)
        assert _objects(f"{prefix}/") == before, "an object was changed or deleted"


def test_train_evaluate_register_and_embed_read_shards_from_s3(s3, small_params, local_ray):
    from pipelines.evaluation.evaluate import evaluate_model
    from pipelines.jobs.embed import EmbedJob, embed
    from pipelines.registry.register import register_model
    from pipelines.training.driver import train_model

    url = f"s3://{BUCKET}/train"
    stage_shards(
        StageJob.from_params(small_params(f"data.shards_dir={url}", preset=DEFAULTS)),
        progress=False,
    )
    params = small_params("train.epochs=2", "evaluate.iw_k=0", "register.mc_samples=1", shards=url)
    result = train_model(TrainJob.from_params(params), progress=False)
    assert result.epochs_run == 2 and result.data_version["manifest_sha256"]
    ev = evaluate_model(EvaluateJob.from_params(params), progress=False)
    assert np.isfinite(ev.metrics["neg_elbo"])
    reg = register_model(RegisterJob.from_params(params), progress=False)
    assert reg.decision == "champion"
    job = EmbedJob.from_params(params)
    seen = len(SERVER_LOG[0].read_text().splitlines())
    out = embed(job, progress=False)
    assert out.n_samples == 1797
    # Each shard read once, by the Ray task that decodes it (none by the driver to check it).
    asked = SERVER_LOG[0].read_text().splitlines()[seen:]
    shard_gets = sorted(line.split()[6] for line in asked if "GET /" in line and ".tar.gz" in line)
    listed = read_manifest(url)
    names = sorted(f"/{BUCKET}/train/{e.name}" for s in SPLITS for e in listed.shards(s))
    assert shard_gets == names, asked

    # Embeddings for downstream jobs in the object store: the same table as the local file,
    # readable by `similar`, re-writable by embed, and never over an object embed did not write.
    from pipelines.errors import PipelineError
    from pipelines.jobs.similar import load_embeddings, similar

    target = f"s3://{BUCKET}/embeddings/digits.parquet"
    remote = embed(job, output=target, progress=False)
    assert remote.output == target and set(_objects("embeddings/")) == {
        "embeddings/digits.parquet", "embeddings/digits.json",
    }  # fmt: skip
    here, there = load_embeddings(out.output), load_embeddings(target)
    assert here.keys == there.keys and np.array_equal(here.mu, there.mu)
    assert (
        similar(target, here.keys[0], k=3).neighbours
        == similar(out.output, here.keys[0], k=3).neighbours
    )
    embed(job, output=target, progress=False)  # its own earlier output: replaced
    import boto3

    boto3.client("s3").put_object(Bucket=BUCKET, Key="embeddings/theirs.parquet", Body=b"x")
    with pytest.raises(PipelineError, match="theirs.parquet exists and was not written"):
        embed(job, output=f"s3://{BUCKET}/embeddings/theirs.parquet", progress=False)
    with pytest.raises(PipelineError, match="no embeddings at"):
        load_embeddings(f"s3://{BUCKET}/embeddings/none.parquet")


def test_object_store_failures_are_one_line_and_fast(s3, small_params, monkeypatch):
    url = f"s3://{BUCKET}/faults"
    stage_shards(
        StageJob.from_params(small_params(f"data.shards_dir={url}", preset=DEFAULTS)),
        progress=False,
    )
    import boto3

    name = read_manifest(url).shards("train")[0].name
    boto3.client("s3").delete_object(Bucket=BUCKET, Key=f"faults/{name}")
    with pytest.raises(PipelineError, match=rf"{name} is missing") as exc:
        verify_shards(url, ["train"])
    assert "\n" not in str(exc.value)

    with pytest.raises(PipelineError, match="no staged shards at s3://no-such-bucket"):
        read_manifest("s3://no-such-bucket/shards")
    boto3.client("s3").put_object(Bucket=BUCKET, Key="mixed/notes.txt", Body=b"mine")
    with pytest.raises(PipelineError, match="holds notes.txt, which staging did not write"):
        stage_shards(
            StageJob.from_params(
                small_params(f"data.shards_dir=s3://{BUCKET}/mixed", preset=DEFAULTS)
            ),
            progress=False,
        )
    assert _objects("mixed/").keys() == {"mixed/notes.txt"}

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nobody there
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    started = time.monotonic()
    with pytest.raises(PipelineError, match="the object store did not answer") as exc:
        read_manifest(url)
    assert time.monotonic() - started < 60 and "\n" not in str(exc.value)
    s3fs.S3FileSystem.clear_instance_cache()


def test_checking_a_prefix_of_many_shards_is_a_listing_not_a_request_per_shard(
    tmp_path, monkeypatch, small_params
):
    """train and evaluate check every shard's size before Ray starts. At 10^4 shards one HEAD
    request each is minutes; one listing of the prefix is a few requests (the server's own
    request log counts them)."""
    import boto3

    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    with s3_server(tmp_path / "s3") as endpoint:
        for key, value in {
            "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        }.items():  # fmt: skip
            monkeypatch.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        url = f"s3://{BUCKET}/many"
        staged = stage_shards(
            StageJob.from_params(
                small_params(f"data.shards_dir={url}", "data.shard_size=30", preset=DEFAULTS)
            ),
            progress=False,
        )
        read_manifest(url)
        log = tmp_path / "s3" / "s3-server.log"
        seen = len(log.read_text().splitlines())
        verify_shards(url, ["train", "val", "test"])
        asked = [line for line in log.read_text().splitlines()[seen:] if "HTTP/1.1" in line]
        assert sum(staged.shards.values()) > 40 and 0 < len(asked) <= 4, asked


def test_dvc_remote_on_the_object_store_push_then_a_clean_clone_pulls(s3, tmp_path):
    """`dvc push` to an s3:// remote on the same server; a fresh clone of the git repo pulls
    byte-identical shards. The endpoint and credentials live only in the environment and
    DVC's --local config (never committed)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_CONFIG_NOSYSTEM": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip

    def sh(cwd: Path, *cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    repo = tmp_path / "repo"
    repo.mkdir()
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "t@example.com")
    sh(repo, "git", "config", "user.name", "t")
    sh(repo, "dvc", "init", "-q")
    (repo / "params.yaml").write_text((REPO / "params.yaml").read_text())
    stage_shards(
        StageJob.from_params(params_in(repo, f"data.shards_dir={repo / 'data' / 'shards'}")),
        progress=False,
    )
    before = file_hashes(repo / "data" / "shards")
    sh(repo, "dvc", "remote", "add", "-d", "store", f"s3://{BUCKET}/dvc")
    sh(repo, "dvc", "remote", "modify", "--local", "store", "endpointurl", s3)
    # The remote as DVC wrote it, read back by the s3-extra check: with dvc-s3 installed, it passes.
    assert default_remote_url(repo) == f"s3://{BUCKET}/dvc"
    check_push_remote(repo)  # dvc-s3 is there, and the live store answers the probe
    sh(repo, "dvc", "add", "data/shards")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "data")
    sh(repo, "dvc", "push")
    assert "testing" not in (repo / ".dvc" / "config").read_text()
    assert any(k.startswith("dvc/") for k in _objects("dvc/"))

    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    sh(clone, "dvc", "remote", "modify", "--local", "store", "endpointurl", s3)
    sh(clone, "dvc", "pull")
    assert file_hashes(clone / "data" / "shards") == before


def test_wrong_credentials_are_one_line_naming_what_to_set(tmp_path, monkeypatch, small_params):
    """A server that checks signatures (moto's IAM emulation): the right key stages, a wrong
    secret is refused in one line that says which settings to fix."""
    import json as _json

    import boto3
    import s3fs

    with s3_server(tmp_path / "s3", auth_after=4) as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        anon = {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **anon)
        iam.create_user(UserName="stager")  # the first requests need no signature
        key = iam.create_access_key(UserName="stager")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}  # fmt: skip
        iam.put_user_policy(UserName="stager", PolicyName="s3", PolicyDocument=_json.dumps(policy))
        boto3.client("s3", **anon).create_bucket(Bucket=BUCKET)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        s3fs.S3FileSystem.clear_instance_cache()
        url = f"s3://{BUCKET}/signed"
        stage_shards(
            StageJob.from_params(small_params(f"data.shards_dir={url}", preset=DEFAULTS)),
            progress=False,
        )

        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        s3fs.S3FileSystem.clear_instance_cache()
        with pytest.raises(PipelineError, match="access denied") as exc:
            read_manifest(url)
        assert "AWS_SECRET_ACCESS_KEY" in str(exc.value) and "\n" not in str(exc.value)
        s3fs.S3FileSystem.clear_instance_cache()
