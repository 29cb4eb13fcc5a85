"""Registration and the promotion gate, on a real MLflow SQLite store per test."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException

from pipelines import tracking
from pipelines.errors import PipelineError
from pipelines.registry import models as registry
from pipelines.registry.register import RegisterJob, register_model
from tests.registry_state import record_writes, registry_snapshot, writes_refused
from vae import load_model

pytestmark = pytest.mark.slow


def _aliases(params, alias="champion") -> dict[str, str | None]:
    client = mlflow.MlflowClient(params.mlflow.tracking_uri)
    return {
        role: registry.alias_version(client, registry.model_name(params.registry.name, role), alias)
        for role in registry.ROLES
    }


def _version(params, role, version):
    client = mlflow.MlflowClient(params.mlflow.tracking_uri)
    return client.get_model_version(registry.model_name(params.registry.name, role), version)


def test_first_registered_pair_becomes_champion_with_linked_tags(store, models):
    params = store("weak", models["weak"])
    res = register_model(RegisterJob.from_params(params), progress=False)
    assert res.decision == "champion" and res.previous_champion is None
    assert _aliases(params) == res.versions == {"encoder": "1", "decoder": "1"}
    enc = _version(params, "encoder", res.versions["encoder"])
    dec = _version(params, "decoder", res.versions["decoder"])
    train = json.loads((params.resolve(params.outputs_dir) / "train/train_result.json").read_text())
    for mv, other in ((enc, res.model_uris["decoder"]), (dec, res.model_uris["encoder"])):
        assert mv.tags["vae.pair"] == other
        assert mv.run_id == train["mlflow_run_id"] == mv.tags["mlflow_run_id"]
        assert mv.tags["data.manifest_sha256"] == train["data_version"]["manifest_sha256"]
        assert mv.tags["git_commit"] == "0" * 40
        assert float(mv.tags["test.neg_elbo"]) == pytest.approx(models["weak"].metrics["neg_elbo"])
        assert mv.tags["gate.decision"] == "champion"
    assert enc.tags["weights_sha256"] == dec.tags["weights_sha256"]
    record = json.loads((params.resolve(params.outputs_dir) / "register/register.json").read_text())
    assert record["decision"] == "champion" and record["encoder_version"] == "1"


def _same_model(loaded, original) -> None:
    """loaded (through MLflow) computes exactly what original does: posterior and decoder."""
    x = torch.rand(5, *original.config.input_shape, generator=torch.Generator().manual_seed(0))
    for a, b in zip(loaded.embed(x), original.embed(x), strict=True):
        assert torch.equal(a, b)
    z = original.embed(x)[0]
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), original.decode(z))


def test_registered_pair_loads_through_mlflow_as_the_trained_model(store, models):
    params = store("weak", models["weak"])
    register_model(RegisterJob.from_params(params), progress=False)
    loaded, version = registry.load_pair(registry.registry_of(params), "champion")
    original = load_model(params.resolve(params.outputs_dir) / "train/model")
    assert version.uri == "models:/digits-vae-encoder/1"
    assert loaded.where == "models:/digits-vae-encoder/1 + models:/digits-vae-decoder/1"
    _same_model(loaded, original)


def test_worse_model_becomes_challenger_and_the_champion_stays(store, models):
    first = register_model(
        RegisterJob.from_params(store("strong", models["strong"])), progress=False
    )
    params = store("untrained", models["untrained"])
    res = register_model(RegisterJob.from_params(params), progress=False)
    assert res.decision == "challenger" and res.previous_champion == first.versions["encoder"]
    assert res.gate["mean_diff"] > 0 and res.gate["ci_low"] > 0
    assert _aliases(params) == first.versions
    assert _aliases(params, "challenger") == res.versions


def test_better_model_is_promoted_and_the_gate_numbers_are_version_tags(store, models):
    first = register_model(RegisterJob.from_params(store("weak", models["weak"])), progress=False)
    params = store("strong", models["strong"])
    res = register_model(RegisterJob.from_params(params), progress=False)
    assert res.decision == "champion" and res.previous_champion == first.versions["encoder"]
    assert _aliases(params) == res.versions
    gate = res.gate
    assert gate["ci_low"] <= gate["mean_diff"] <= gate["ci_high"] < 0
    assert gate["n_examples"] == models["strong"].metrics["n_examples"]
    # The gate scored the new model and the champion (other z draws than their evaluations).
    strong, weak = models["strong"].metrics["neg_elbo"], models["weak"].metrics["neg_elbo"]
    assert abs(gate["new_neg_elbo"] - strong) < abs(gate["new_neg_elbo"] - weak)
    assert abs(gate["champion_neg_elbo"] - weak) < abs(gate["champion_neg_elbo"] - strong)
    for role in registry.ROLES:
        tags = _version(params, role, res.versions[role]).tags
        assert tags["gate.decision"] == "champion"
        assert tags["gate.champion_version"] == first.versions["encoder"]
        for key in ("mean_diff", "ci_low", "ci_high", "confidence", "margin", "n_examples"):
            assert float(tags[f"gate.{key}"]) == pytest.approx(float(gate[key]))


def test_improvement_smaller_than_the_margin_keeps_the_champion(store, models):
    first = register_model(RegisterJob.from_params(store("weak", models["weak"])), progress=False)
    params = store("strong", models["strong"], "register.margin=1000", "register.require_ci=false")
    res = register_model(RegisterJob.from_params(params), progress=False)
    assert res.gate["mean_diff"] < 0  # better, but not by 1000 nats per example
    assert res.decision == "challenger"
    assert _aliases(params) == first.versions


def _db(params) -> Path:
    return Path(params.mlflow.tracking_uri.removeprefix("sqlite:///"))


def _assert_champion_is(params, trained) -> None:
    """The champion pair loads through MLflow and computes what trained's model does."""
    _same_model(registry.load_pair(registry.registry_of(params), "champion")[0], trained.model)


def test_failure_moving_the_decoder_alias_leaves_aliases_and_registry_untouched(store, models):
    """The store itself refuses the decoder's alias write, after both new versions exist and the
    encoder's champion alias has moved: the alias goes back, both versions go, the old pair is
    still the champion and loads."""
    first = register_model(RegisterJob.from_params(store("weak", models["weak"])), progress=False)
    params = store("strong", models["strong"])
    before = registry_snapshot(params.mlflow.tracking_uri)
    created = record_writes(_db(params), "model_versions", "NEW.name || '/' || NEW.version")
    aliased = record_writes(
        _db(params),
        "registered_model_aliases",
        "NEW.name || '@' || NEW.alias || '=' || NEW.version",
    )
    refused = "NEW.name = 'digits-vae-decoder'"
    with writes_refused(_db(params), "registered_model_aliases", refused, "store went away"):
        with pytest.raises(MlflowException, match="store went away"):
            register_model(RegisterJob.from_params(params), progress=False)
    # Half-way: the new pair existed and the encoder's alias had moved to it, then was undone.
    assert created()[:2] == ["digits-vae-encoder/2", "digits-vae-decoder/2"]
    assert [w for w in aliased() if w.startswith("digits-vae-encoder@")] == [
        "digits-vae-encoder@champion=2",
        "digits-vae-encoder@champion=1",
    ]
    assert registry_snapshot(params.mlflow.tracking_uri) == before
    assert _aliases(params) == first.versions
    _assert_champion_is(params, models["weak"])


def test_failure_logging_the_decoder_registers_nothing(store, models):
    """The store refuses the decoder's logged model, after the encoder's was logged into the
    run: no version is created, even for a moment, and the champion stays and loads."""
    first = register_model(RegisterJob.from_params(store("weak", models["weak"])), progress=False)
    params = store("strong", models["strong"])
    before = registry_snapshot(params.mlflow.tracking_uri)
    logged = record_writes(_db(params), "logged_models", "NEW.name || ':' || NEW.source_run_id")
    created = record_writes(_db(params), "model_versions", "NEW.name || '/' || NEW.version")
    with writes_refused(_db(params), "logged_models", "NEW.name = 'decoder'", "store went away"):
        with pytest.raises(MlflowException, match="store went away"):
            register_model(RegisterJob.from_params(params), progress=False)
    run_id = json.loads(
        (params.resolve(params.outputs_dir) / "train/train_result.json").read_text()
    )["mlflow_run_id"]
    assert f"encoder:{run_id}" in logged() and not any(e.startswith("decoder") for e in logged())
    assert created() == []
    assert registry_snapshot(params.mlflow.tracking_uri) == before
    assert _aliases(params) == first.versions
    _assert_champion_is(params, models["weak"])


def test_register_without_evaluation_metrics_says_which_stage_to_run(store, models):
    params = store("weak", models["weak"])
    (params.resolve(params.outputs_dir) / "evaluate/metrics.json").unlink()
    with pytest.raises(PipelineError, match="run 'vae-pipeline evaluate' first"):
        register_model(RegisterJob.from_params(params), progress=False)


def test_registering_the_same_training_run_again_is_a_no_op_that_says_so(store, models):
    """What every `dvc repro` of an unchanged pipeline did: an identical new challenger."""
    params = store("strong", models["strong"])
    first = register_model(RegisterJob.from_params(params), progress=False)
    client = tracking.client(tracking.store_of(params))
    count = len(client.search_model_versions("name='digits-vae-encoder'"))
    again = register_model(RegisterJob.from_params(params), progress=False)
    assert again.decision == "unchanged" and again.versions == first.versions
    assert again.reason.startswith(
        f"these weights of training run {first.mlflow_run_id} are "
        f"already registered as version {first.versions['encoder']}"
    )
    assert len(client.search_model_versions("name='digits-vae-encoder'")) == count
    assert _aliases(params) == first.versions  # the champion did not move
    # Registered by an older vae-pipeline (no export format in its tags or MLflow metadata):
    # registered again, and the gate cannot score the old champion, which stays champion.
    _as_older_export(client, first.versions)
    third = register_model(RegisterJob.from_params(params), progress=False)
    assert third.decision == "challenger" and third.versions == {"encoder": "2", "decoder": "2"}
    assert third.reason.startswith(
        "not comparable with champion: models:/digits-vae-encoder/1 has no encoder of export "
        "format 2 in its MLflow metadata"
    ), third.reason
    assert _aliases(params) == first.versions


def _as_older_export(client, versions: dict[str, str]) -> None:
    import yaml
    from mlflow.utils.file_utils import local_file_uri_to_path

    for role, version in versions.items():
        name = f"digits-vae-{role}"
        client.delete_model_version_tag(name, version, "vae.export_format")
        folder = Path(local_file_uri_to_path(client.get_model_version_download_uri(name, version)))
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
        mlmodel.pop("metadata")
        (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))


def test_evaluate_and_register_against_another_store_than_train_are_one_line(
    store, models, tmp_path
):
    """train logged to one store, the user's settings now name another (a server that went
    away and the embedded default took over): both stages refuse in one line, not a crash."""
    from pipelines.evaluation.evaluate import EvaluateJob, evaluate_model

    params = store("strong", models["strong"])
    other = params.model_copy(update={"mlflow": params.mlflow.model_copy(
        update={"tracking_uri": f"sqlite:///{tmp_path / 'other.db'}"})})  # fmt: skip
    for stage, job in (
        (evaluate_model, EvaluateJob.from_params(other)),
        (register_model, RegisterJob.from_params(other)),
    ):
        with pytest.raises(PipelineError, match=r"training run \w+ \(train_result.json\) is not "
                           r"in sqlite:///.*other.db \(train logged to sqlite:///"):  # fmt: skip
            stage(job, progress=False)
