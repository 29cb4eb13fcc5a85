"""Downstream jobs on a registered champion: embed (real local Ray), similar, generate, and
loading the champion with plain MLflow in a process that never imports this project."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.cli import main
from pipelines.data.shards.manifest import read_manifest
from pipelines.data.versioning.lineage import manifest_sha256
from pipelines.errors import PipelineError
from pipelines.jobs.embed import EmbedJob
from pipelines.jobs.embed import embed as embed_job
from pipelines.jobs.generate import generate as generate_job
from pipelines.jobs.similar import load_embeddings, similar
from pipelines.paths import layout
from pipelines.registry import models as registry
from pipelines.registry.register import RegisterJob, register_model
from tests.helpers.params import REGISTRY, overrides_in, params_in, set_args
from tests.registry.conftest import split_tensor, write_stage_outputs
from vae import load_model

pytestmark = pytest.mark.slow


def embed(params, **kwargs):
    return embed_job(EmbedJob.from_params(params), **kwargs)


def generate(params, **kwargs):
    return generate_job(registry.registry_of(params), layout(params), **kwargs)


def _trained(params):
    """The model register read (the training output), to compare MLflow's copy with."""
    return load_model(params.resolve(params.outputs_dir) / "train/model")


@pytest.fixture(scope="module")
def champion(tmp_path_factory, staged_shards, models):
    """A store whose champion is the strong model."""
    work = tmp_path_factory.mktemp("champion")
    params = params_in(work, *REGISTRY, "outputs_dir=out", shards=staged_shards, own_root=True)
    write_stage_outputs(params, models["strong"], "strong")
    register_model(RegisterJob.from_params(params), progress=False)
    return params


@pytest.fixture(scope="module")
def embedded(champion, local_ray):
    return embed(champion, progress=False)


def test_embed_writes_every_staged_sample_with_keys_and_a_sidecar(embedded, champion):
    shards = champion.resolve(champion.data.shards_dir)
    manifest = read_manifest(shards)
    table = pq.read_table(embedded.output)
    assert table.num_rows == sum(manifest.split_of(s).samples for s in ("train", "val", "test"))
    assert table.column_names == ["key", "split", "label", "mu"]
    keys = table["key"].to_pylist()
    assert len(set(keys)) == len(keys) and keys[0].startswith("digits-")
    sidecar = json.loads(open(embedded.sidecar).read())
    assert sidecar["model_uri"] == "models:/digits-vae-encoder/1"
    assert sidecar["requested"] == "models:/digits-vae-encoder@champion"
    assert sidecar["data"]["manifest_sha256"] == manifest_sha256(shards)
    assert sidecar["n_samples"] == table.num_rows and sidecar["latent_dim"] == 6


def test_embeddings_are_the_trained_models_posterior_means_in_shard_order(embedded, champion):
    test_x, test_keys, _ = split_tensor(champion.resolve(champion.data.shards_dir), "test")
    emb = load_embeddings(embedded.output)
    rows = [emb.keys.index(k) for k in test_keys]
    assert rows == sorted(rows)  # shard order, then sample order
    mu, _ = _trained(champion).embed(test_x)
    np.testing.assert_allclose(emb.mu[rows], mu.numpy(), rtol=1e-5, atol=1e-5)


def test_neighbours_of_a_digit_are_mostly_the_same_digit(embedded):
    emb = load_embeddings(embedded.output)
    queries = emb.keys[:: len(emb.keys) // 20][:20]
    same = []
    for key in queries:
        res = similar(embedded.output, key, k=10)
        assert len(res.neighbours) == 10 and key not in [n.key for n in res.neighbours]
        assert [n.distance for n in res.neighbours] == sorted(n.distance for n in res.neighbours)
        assert all(float(f"{n.distance:.6g}") == n.distance for n in res.neighbours), "6 digits"
        same.append(sum(n.label == res.label for n in res.neighbours))
    assert np.mean(same) >= 7, same


def test_similar_unknown_key_is_a_one_line_error(embedded):
    with pytest.raises(PipelineError, match="key 'nope' is not in") as err:
        similar(embedded.output, "nope")
    assert "\n" not in str(err.value)


def test_embed_of_an_array_file_keeps_row_keys_labels_and_logvar(champion, local_ray, tmp_path):
    test_x, _, labels = split_tensor(champion.resolve(champion.data.shards_dir), "test")
    np.savez(tmp_path / "few.npz", x=test_x[:50, 0].numpy(), y=labels[:50].numpy())
    res = embed(
        champion, source=str(tmp_path / "few.npz"), output=str(tmp_path / "few.parquet"),
        include_logvar=True, model_uri="1", progress=False,
    )  # fmt: skip
    table = pq.read_table(res.output)
    assert table.column_names == ["key", "label", "mu", "logvar"]
    assert table["key"].to_pylist() == [f"array-{i:07d}" for i in range(50)]
    assert table["label"].to_pylist() == labels[:50].tolist()
    _, logvar = _trained(champion).embed(test_x[:50])
    got = np.stack(table["logvar"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, logvar.numpy(), rtol=1e-5, atol=1e-5)
    assert json.loads(open(res.sidecar).read())["data"]["kind"] == "array"


def test_embed_of_an_array_with_nan_fails_in_one_line_before_ray(champion, tmp_path):
    x = np.random.default_rng(0).random((5, 8, 8)).astype(np.float32)
    x[3, 2, 2] = np.nan
    np.save(tmp_path / "bad.npy", x)
    with pytest.raises(PipelineError, match="NaN") as err:
        embed(champion, source=str(tmp_path / "bad.npy"), progress=False)
    assert "\n" not in str(err.value)


def test_embed_without_a_champion_says_to_register_first(small_params, staged_shards):
    params = small_params(preset=REGISTRY, shards=staged_shards, own_root=True)
    with pytest.raises(PipelineError, match="no 'champion' alias.*run 'vae-pipeline register'"):
        embed(params, progress=False)


@pytest.mark.parametrize("uri", ["models:/digits-vae-encoder", "runs:/abc/model", "a b"])
def test_malformed_model_reference_is_a_one_line_error(champion, uri):
    with pytest.raises(PipelineError) as err:
        embed(champion, model_uri=uri, progress=False)
    assert "\n" not in str(err.value) and uri in str(err.value)


def test_generate_writes_a_png_grid_from_the_champion_decoder(champion, tmp_path):
    import matplotlib.image

    res = generate(champion, n=64, out=str(tmp_path / "samples.png"), seed=3)
    assert res.model_uri == "models:/digits-vae-decoder/1"
    img = matplotlib.image.imread(res.image)
    assert img.shape[0] > 100 and img.shape[1] > 100


def test_cli_similar_and_generate_print_json_and_user_errors_exit_2(
    embedded, champion, tmp_path, capsys, staged_shards
):
    work = champion.root
    sets = overrides_in(work, *REGISTRY, "outputs_dir=out", shards=staged_shards)
    args = ["--params", str(work / "params.yaml"), "--json", *set_args(sets)]
    key = load_embeddings(embedded.output).keys[0]
    assert main(["similar", key, "-k", "3", *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["key"] == key and len(out["neighbours"]) == 3
    assert main(["generate", "-n", "4", "--out", str(tmp_path / "g.png"), *args]) == 0
    assert (tmp_path / "g.png").is_file()
    capsys.readouterr()
    assert main(["generate", "--model", "models:/x", *args]) == 2
    captured = capsys.readouterr()
    # Without --quiet: which params file, then the one error line; the JSON says the same.
    params_line, error_line = captured.err.splitlines()
    assert params_line == f"params: {work / 'params.yaml'}" and error_line.startswith("error: ")
    assert json.loads(captured.out)["error"] == error_line.removeprefix("error: ")


def test_similar_refuses_a_table_made_by_an_older_encoder_than_the_champion(
    embedded, champion, capsys, staged_shards
):
    """A promotion after the table was written: similar says so in one line, names both
    versions, and --allow-old-encoder still reads it."""
    from pipelines import tracking
    from pipelines.jobs.similar import check_follows_champion

    client = tracking.client(tracking.store_of(champion))
    name = "digits-vae-encoder"
    first = client.get_model_version(name, "1")
    newer = client.create_model_version(name, first.source, run_id=first.run_id)
    client.set_registered_model_alias(name, "champion", newer.version)
    sets = overrides_in(champion.root, *REGISTRY, "outputs_dir=out", shards=staged_shards)
    args = ["--params", str(champion.root / "params.yaml"), "--json", "--quiet", *set_args(sets)]
    key = load_embeddings(embedded.output).keys[0]
    try:
        with pytest.raises(PipelineError, match=rf"made by models:/{name}/1, older than the "
                           rf"champion models:/{name}/{newer.version}; re-run"):  # fmt: skip
            check_follows_champion(registry.registry_of(champion), embedded.output)
        capsys.readouterr()
        assert main(["similar", key, *args]) == 2
        assert "older than the champion" in json.loads(capsys.readouterr().out)["error"]
        assert main(["similar", key, "--allow-old-encoder", *args]) == 0
        assert json.loads(capsys.readouterr().out)["encoder"] == f"models:/{name}/1"
    finally:
        client.set_registered_model_alias(name, "champion", "1")
        client.delete_model_version(name, newer.version)
    assert (
        check_follows_champion(registry.registry_of(champion), embedded.output)
        == f"models:/{name}/1"
    )


_PLAIN_MLFLOW = textwrap.dedent(
    """
    import sys
    import mlflow, numpy as np, torch

    mlflow.set_tracking_uri(sys.argv[1])
    x = np.load(sys.argv[2])
    enc = mlflow.pytorch.load_model("models:/digits-vae-encoder@champion")
    with torch.no_grad():
        np.save(sys.argv[3], enc(torch.from_numpy(x)).numpy())
    np.save(sys.argv[4], mlflow.pyfunc.load_model("models:/digits-vae-encoder@champion").predict(x))
    dec = mlflow.pyfunc.load_model("models:/digits-vae-decoder@champion")
    np.save(sys.argv[5], dec.predict(np.load(sys.argv[6])))
    leaked = [m for m in sys.modules if m.split(".")[0] in ("vae", "pipelines", "tests")]
    assert not leaked, leaked
    """
)


def test_champion_loads_with_plain_mlflow_in_a_fresh_process_and_embeds_the_same(
    champion, tmp_path
):
    test_x, _, _ = split_tensor(champion.resolve(champion.data.shards_dir), "test")
    x = test_x[:37].numpy()
    z = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "z.npy", z)
    files = [tmp_path / f for f in ("pt.npy", "pyfunc.npy", "dec.npy")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [sys.executable, "-c", _PLAIN_MLFLOW, champion.mlflow.tracking_uri, str(tmp_path / "x.npy"),
         *map(str, files[:2]), str(files[2]), str(tmp_path / "z.npy")],
        cwd=tmp_path, env=env, check=True, timeout=180,
    )  # fmt: skip
    model = _trained(champion)
    mu, logvar = model.embed(torch.from_numpy(x))
    ours = torch.cat([mu, logvar], -1).numpy()
    for f in files[:2]:
        np.testing.assert_allclose(np.load(f), ours, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the likelihood's parameters: for this Gaussian, the mean image
        images = model.likelihood.mean(model.decode(torch.from_numpy(z))).reshape(5, 1, 8, 8)
    np.testing.assert_allclose(np.load(files[2]), images.numpy(), rtol=1e-5, atol=1e-5)


def _damaged_copy(params, tmp_path, damage) -> str:
    """A new encoder version whose MLflow model is a copy of the champion's, damaged; returns
    its version number (the caller deletes it)."""
    import shutil

    from mlflow.utils.file_utils import local_file_uri_to_path

    from pipelines import tracking

    client = tracking.client(tracking.store_of(params))
    name = "digits-vae-encoder"
    champion = client.get_model_version_by_alias(name, "champion")
    source = client.get_model_version_download_uri(name, champion.version)
    copy = tmp_path / "model"
    shutil.copytree(local_file_uri_to_path(source), copy)
    damage(copy)
    mv = client.create_model_version(name, str(copy), run_id=champion.run_id, tags=champion.tags)
    return str(mv.version)


def _truncate_program(folder) -> None:
    program = folder / "data" / "model.pt2"
    program.write_bytes(program.read_bytes()[:1000])


def _drop_metadata(folder) -> None:
    """What a version registered before the export format was recorded looks like."""
    import yaml

    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    mlmodel.pop("metadata")
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (_truncate_program, "pt2 program does not load with mlflow.pytorch.load_model"),
        (_drop_metadata, "registered by an older vae-pipeline"),
    ],
    ids=["broken-pt2", "older-export"],
)
def test_embed_of_a_version_mlflow_cannot_load_is_one_line_naming_it(
    champion, tmp_path, damage, says
):
    from pipelines import tracking

    version = _damaged_copy(champion, tmp_path, damage)
    try:
        with pytest.raises(PipelineError) as err:
            embed(champion, model_uri=version, output=str(tmp_path / "e.parquet"), progress=False)
        msg = str(err.value)
        assert f"models:/digits-vae-encoder/{version}" in msg and says in msg, msg
        assert "\n" not in msg and "re-register" in msg
    finally:
        client = tracking.client(tracking.store_of(champion))
        client.delete_model_version("digits-vae-encoder", version)
