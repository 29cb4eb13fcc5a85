"""Ray Train DDP training and held-out evaluation, on a real local Ray cluster and MLflow."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlflow
import pytest

from pipelines.errors import PipelineError
from pipelines.evaluation import figures
from pipelines.evaluation.evaluate import EvaluateJob, evaluate_model
from pipelines.paths import layout
from pipelines.training.driver import train_model
from pipelines.training.job import TrainJob
from tests.helpers.params import TRAINING, params_in

pytestmark = pytest.mark.slow


# Secrets in the driver's environment, as on a CI runner or a cluster node: none may reach MLflow.
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "s3cr3t-aws-8c1f0b",
    "MY_SERVICE_API_TOKEN": "tok-5e9d27a4",
    "DATABASE_PASSWORD": "pw-73b1c0",
}


@pytest.fixture(scope="module")
def trained(local_ray, staged_digits, tmp_path_factory):
    work = tmp_path_factory.mktemp("train")
    params = params_in(work, *TRAINING, "cluster.run_name=first", shards=staged_digits)
    saved = {k: os.environ.get(k) for k in SECRETS}
    os.environ.update(SECRETS)
    try:
        result = train_model(TrainJob.from_params(params), progress=False)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return params, result


def test_two_worker_training_exports_the_best_model_and_learning_curves(trained):
    params, result = trained
    assert result.num_workers == 2 and result.epochs_run == 3
    out = params.resolve(params.outputs_dir) / "train"
    assert (out / "model" / "model.safetensors").is_file()
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[-1]["val_neg_elbo"] < history[0]["val_neg_elbo"]
    assert result.best_val_neg_elbo == min(h["val_neg_elbo"] for h in history)
    assert (out / "learning_curve.csv").read_text().startswith("epoch,train_loss,val_neg_elbo")


def test_mlflow_run_holds_params_epoch_metrics_data_version_and_git_commit(trained):
    params, result = trained
    client = mlflow.MlflowClient(result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["cluster.num_workers"] == "2"
    assert run.data.params["model.likelihood"] == "gaussian"
    assert run.data.tags["data.manifest_sha256"] == result.data_version["manifest_sha256"]
    assert run.data.tags["git_commit"]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_neg_elbo")]
    assert steps == [0, 1, 2]


def test_no_secret_from_the_environment_reaches_the_tracking_store(trained):
    params, result = trained
    run = mlflow.MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id)
    logged = [*run.data.params.values(), *run.data.tags.values()]
    store = Path(result.tracking_uri.removeprefix("sqlite:///"))
    files = [store, *store.parent.joinpath("mlartifacts").rglob("*")]
    blobs = [p.read_bytes() for p in files if p.is_file()]
    for name, secret in SECRETS.items():
        assert not any(secret in value for value in logged), f"{name} in params or tags"
        assert not any(secret.encode() in blob for blob in blobs), f"{name} in the MLflow store"


def test_nan_loss_stops_training_with_a_clear_error_naming_epoch_and_step(
    local_ray, staged_digits, small_params
):
    params = small_params("cluster.run_name=nan", "train.lr=1e30", "train.grad_clip_norm=null",
                          shards=staged_digits)  # fmt: skip
    with pytest.raises(PipelineError, match=r"epoch \d+, step \d+"):
        train_model(TrainJob.from_params(params), progress=False)
    assert not (params.resolve(params.outputs_dir) / "train" / "model").exists()


def test_evaluate_writes_metrics_figures_and_logs_them_to_the_training_run(trained, monkeypatch):
    params, result = trained
    drawn: dict[str, object] = {}
    real_save = figures.save

    def recording_save(fig, path):
        drawn[Path(path).name] = fig
        return real_save(fig, path)

    monkeypatch.setattr(figures, "save", recording_save)
    ev = evaluate_model(EvaluateJob.from_params(params), progress=False)
    m = ev.metrics
    assert m["likelihood"] == "gaussian" and m["units"] == "nats per example"
    assert m["n_examples"] > 0 and m["iw_k"] == 20
    assert m["neg_elbo"] == pytest.approx(m["recon_nll"] + m["kl"])
    assert json.loads(open(ev.metrics_file).read())["neg_elbo"] == m["neg_elbo"]
    scores = json.loads((Path(ev.metrics_file).parent / "scores.json").read_text())
    want = ("neg_elbo", "recon_nll", "kl", "iw_nll", "iw_nll_se", "active_units")
    assert scores == {k: m[k] for k in want}
    # evaluate.iw_examples (2000) is above the test split's size: every example has IW.
    assert m["iw_examples"] == m["n_examples"] and m["iw_nll_se"] > 0
    assert m["decoder"] == "gaussian (fixed sigma 0.1)" and m["objective"] == "elbo"
    assert run_tags(result)["eval.decoder"] == m["decoder"]
    assert sorted(ev.figures) == ["latent", "learning_curves", "reconstructions", "samples"]
    assert sorted(Path(p).name for p in ev.figures.values()) == sorted(drawn)
    assert all(figures.is_ours(Path(p)) for p in ev.figures.values())
    # What the figures show, drawn from this run's test split and history (their pixels and
    # points are checked against the model in tests/training/test_figure_contents.py).
    # One scatter per class, named in the legend with the manifest's class names (the digits').
    latent = drawn["latent.png"].axes[0]
    points = sum(len(c.get_offsets()) for c in latent.collections)
    assert points == m["n_examples"], "one point per test example"
    names = [t.get_text() for t in latent.get_legend().get_texts()]
    assert set(names) <= {str(d) for d in range(10)} and len(names) == len(latent.collections)
    history = json.loads(
        (params.resolve(params.outputs_dir) / "train" / "history.json").read_text()
    )
    curves = {line.get_label(): line for line in drawn["learning_curves.png"].axes[0].lines}
    assert list(curves["validation -ELBO"].get_ydata()) == [h["val_neg_elbo"] for h in history]
    client = mlflow.MlflowClient(result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.metrics["test_neg_elbo"] == pytest.approx(m["neg_elbo"])
    # The digits record no generative factors: no MIG anywhere (sprites: test_mig_in_evaluate).
    written = json.loads(Path(ev.metrics_file).read_text())
    assert not {"mig", "mig_per_factor"} & (set(m) | set(written))
    assert "test_mig" not in run.data.metrics
    arts = {a.path for a in client.list_artifacts(result.mlflow_run_id, "figures")}
    assert "figures/reconstructions.png" in arts


def run_tags(result) -> dict:
    return mlflow.MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id).data.tags


def test_train_without_staged_shards_says_to_run_stage(tmp_path, small_params):
    params = small_params(shards=tmp_path / "missing")
    with pytest.raises(PipelineError, match="run 'vae-pipeline stage'"):
        train_model(TrainJob.from_params(params), progress=False)


def test_unreachable_mlflow_server_fails_in_one_line_before_training(
    staged_digits, tmp_path, small_params
):
    from tests.servers import free_port

    params = small_params(
        f"mlflow.tracking_uri=http://127.0.0.1:{free_port()}", shards=staged_digits
    )
    with pytest.raises(PipelineError, match="unreachable") as info:
        train_model(TrainJob.from_params(params), progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# One tiny run (1 worker) for what only a whole training shows: a learning rate so high that
# validation stops improving within a few epochs (seeded, so the same epochs every time), a
# KL warm-up, and a corrupt train shard skipped under data.on_corrupt: skip.
PATIENCE, MAX_EPOCHS = 2, 12


@pytest.fixture(scope="module")
def stopped_early(trained, staged_digits, tmp_path_factory):
    """The run, and its history.json. It logs into `trained`'s MLflow store (creating a
    SQLite store costs seconds) under a run of its own."""
    work = tmp_path_factory.mktemp("stopped-early")
    shards = work / "shards"
    shutil.copytree(staged_digits, shards)
    corrupt = shards / "train-000001.tar.gz"
    corrupt.write_bytes(corrupt.read_bytes()[:1000])
    params = params_in(
        # One part: the other train shard is corrupt, and a part needs a readable one.
        work, *TRAINING, "cluster.run_name=stopped-early", "cluster.num_workers=1",
        "train.batch_parts=1",
        # A large clipped step: validation stops improving within a few epochs.
        "data.on_corrupt=skip", "train.lr=0.3", "train.grad_clip_norm=10", f"train.epochs={MAX_EPOCHS}",
        f"train.early_stopping_patience={PATIENCE}", "train.kl_warmup_epochs=2",
        f"mlflow.tracking_uri={trained[0].mlflow.tracking_uri}", shards=shards,
    )  # fmt: skip
    result = train_model(TrainJob.from_params(params), progress=False)
    history = json.loads(Path(result.model_dir).parent.joinpath("history.json").read_text())
    return result, history


def mlflow_series(result, key: str) -> list[tuple[int, float]]:
    client = mlflow.MlflowClient(result.tracking_uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(result.mlflow_run_id, key))


def test_training_stops_patience_epochs_after_its_best_and_mlflow_shows_each_epoch_once(
    stopped_early,
):
    result, history = stopped_early
    last = result.epochs_run - 1
    assert result.early_stopped and result.epochs_run < MAX_EPOCHS
    assert [h["epoch"] for h in history] == list(range(result.epochs_run))
    # The best epoch, then exactly `patience` epochs that did not beat it.
    assert result.best_epoch == last - PATIENCE
    assert history[result.best_epoch]["improved"]
    assert not any(h["improved"] for h in history[result.best_epoch + 1 :])
    assert all(h["val_neg_elbo"] > result.best_val_neg_elbo for h in history[-PATIENCE:])
    assert [s for s, _ in mlflow_series(result, "val_neg_elbo")] == list(range(last + 1))


def test_kl_weight_ramps_over_the_warmup_epochs_and_mlflow_logs_it_per_epoch(stopped_early):
    result, history = stopped_early
    ramp = [0.5] + [1.0] * (result.epochs_run - 1)  # kl_warmup_epochs=2, beta 1
    assert [h["kl_weight"] for h in history] == ramp
    assert mlflow_series(result, "kl_weight") == list(enumerate(ramp))
    assert not history[0]["improved"], "a warm-up epoch is never the best"


def test_a_skipped_corrupt_shard_reaches_mlflow_as_skipped_shards_every_epoch(stopped_early):
    result, history = stopped_early
    assert [h["skipped_shards"] for h in history] == [1] * result.epochs_run
    assert mlflow_series(result, "skipped_shards") == [(e, 1.0) for e in range(len(history))]
    assert result.skipped_shards == result.epochs_run


def test_only_the_best_and_the_latest_checkpoints_are_kept_and_the_best_is_exported(
    stopped_early,
):
    result, history = stopped_early
    run_dir = Path(result.checkpoint).parent
    kept = sorted(p.name for p in run_dir.glob("checkpoint_epoch_*"))
    # Early stopping put the best `patience` epochs before the latest: not the 2 newest.
    assert kept == [f"checkpoint_epoch_{e:05d}" for e in (result.best_epoch, len(history) - 1)]
    assert Path(result.checkpoint).name == kept[0]
    weights = "model/model.safetensors"
    exported = Path(result.model_dir) / "model.safetensors"
    assert exported.read_bytes() == (run_dir / kept[0] / weights).read_bytes()
    assert exported.read_bytes() != (run_dir / kept[1] / weights).read_bytes()


def test_rerun_resumes_without_repeating_epochs_and_more_epochs_continue_the_run(trained, tmp_path):
    """Last in this module: it extends the shared run to 4 epochs (its outputs go elsewhere).
    Same seed, data and worker count giving the same numbers is shown in tests/infra."""
    params, first = trained
    # The same job finished already: exported again from its checkpoints without starting Ray.
    assert (Path(first.checkpoint).parent / "finished.json").is_file()
    again = train_model(TrainJob.from_params(params), progress=False)
    assert again.mlflow_run_id == first.mlflow_run_id and again.checkpoint == first.checkpoint
    assert again.epochs_run == first.epochs_run and again.started_at_epoch == 3
    assert first.reused is None and again.reused.startswith(
        f"reused the finished run {first.run_name} (same params and data): nothing trained"
    ), "a reuse says so"
    recorded = json.loads((layout(params).train_dir / "train_result.json").read_text())
    assert recorded == again.to_dict(), "train_result.json records the reuse as --json prints it"
    client = mlflow.MlflowClient(first.tracking_uri)
    steps = [m.step for m in client.get_metric_history(first.mlflow_run_id, "val_neg_elbo")]
    assert steps == [0, 1, 2]

    longer = params.model_copy(
        update={"outputs_dir": str(tmp_path / "outputs"),
                "train": params.train.model_copy(update={"epochs": 4})}
    )  # fmt: skip
    res = train_model(TrainJob.from_params(longer), progress=False)
    assert res.mlflow_run_id == first.mlflow_run_id and res.started_at_epoch == 3
    assert res.reused is None
    steps = [m.step for m in client.get_metric_history(res.mlflow_run_id, "val_neg_elbo")]
    assert steps == [0, 1, 2, 3]
