"""Cheap stand-ins for the train and evaluate stages: small models fitted in-process on the
staged digits shards, written where those stages write, with a real MLflow run per store."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipelines import tracking
from pipelines.data.staging import StageJob
from pipelines.data.versioning.lineage import data_version
from pipelines.params import Params
from tests.helpers.params import REGISTRY, REGISTRY_LATENT, params_in
from vae import Autoencoder, TrainConfig, build_model, evaluate, fit, save_model

LATENT = REGISTRY_LATENT


def split_tensor(shards_dir: Path, split: str) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    from pipelines.data.shards.loader import make_loader

    batches = list(make_loader(shards_dir, split, 512, shuffle=False, equalize=False))
    return (
        torch.cat([b["x"] for b in batches]),
        [k for b in batches for k in b["key"]],
        torch.cat([b["label"] for b in batches]),
    )


@dataclass
class Trained:
    model: Autoencoder
    metrics: dict


def fit_model(params: Params, epochs: int, seed: int = 0) -> Trained:
    shards = params.resolve(params.data.shards_dir)
    train_x, _, _ = split_tensor(shards, "train")
    val_x, _, _ = split_tensor(shards, "val")
    test_x, _, _ = split_tensor(shards, "test")
    model = build_model(params.model.to_config(tuple(train_x.shape[1:])), seed=seed)
    if epochs:
        cfg = TrainConfig(epochs=epochs, batch_size=64, seed=seed, early_stopping_patience=None)
        fit(model, train_x, val_x, cfg)
    model.eval()
    return Trained(model, evaluate(model, test_x, iw_k=0).to_dict())


def write_stage_outputs(params: Params, trained: Trained, run_name: str) -> str:
    """What `train` and `evaluate` leave behind, with a real run in params' MLflow store."""
    out = params.resolve(params.outputs_dir)
    save_model(trained.model, out / "train" / "model")
    client = tracking.client(tracking.store_of(params))
    run = client.create_run(
        tracking.experiment_id(tracking.store_of(params)),
        run_name=run_name,
        tags={"git_commit": "0" * 40},
    )
    client.set_terminated(run.info.run_id)
    info = {
        "run_name": run_name,
        "mlflow_run_id": run.info.run_id,
        "tracking_uri": tracking.store_of(params).uri,
        "data_version": data_version(params.root, params.resolve(params.data.shards_dir)),
        "likelihood": trained.model.config.likelihood,
    }
    (out / "train" / "train_result.json").write_text(json.dumps(info))
    (out / "evaluate").mkdir(parents=True, exist_ok=True)
    (out / "evaluate" / "metrics.json").write_text(json.dumps(trained.metrics))
    return run.info.run_id


@pytest.fixture(scope="session")
def staged_shards(tmp_path_factory) -> Path:
    from pipelines.data.staging import stage_shards

    root = tmp_path_factory.mktemp("registry-data")
    stage_shards(
        StageJob.from_params(params_in(root, *REGISTRY, shards=root / "shards", own_root=True)),
        progress=False,
    )
    return root / "shards"


@pytest.fixture(scope="session")
def models(staged_shards, tmp_path_factory) -> dict[str, Trained]:
    """untrained (clearly worst), weak (a few epochs), strong (clearly best)."""
    params = params_in(
        tmp_path_factory.mktemp("fit"), *REGISTRY, shards=staged_shards, own_root=True
    )
    return {
        "untrained": fit_model(params, 0),
        "weak": fit_model(params, 3),
        "strong": fit_model(params, 60),
    }


@pytest.fixture
def store(small_params, staged_shards):
    """A fresh MLflow store; store(label, trained) readies that model's stage outputs."""

    def ready(label: str, trained: Trained, *overrides: str) -> Params:
        params = small_params(
            f"outputs_dir=out-{label}", *overrides,
            preset=REGISTRY, shards=staged_shards, own_root=True,
        )  # fmt: skip
        write_stage_outputs(params, trained, label)
        return params

    return ready
