"""Train and evaluate a model in-process on a data source held in memory: no Ray, no services.

The fastest way to try a model config; the full pipeline (`retrain`) adds shards, Ray, MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipelines.data.shards.format import SPLITS
from pipelines.data.sources.catalog import load_source
from pipelines.data.splitting import plan_splits
from pipelines.errors import PipelineError
from pipelines.params import DataParams, EvaluateParams, ModelParams, Params, TrainParams
from vae import EvalResult, build_model, evaluate, fit, save_model


@dataclass
class QuickstartResult:
    metrics: EvalResult
    best_epoch: int
    epochs_run: int
    model_dir: Path

    def to_dict(self) -> dict:
        return {
            "metrics": self.metrics.to_dict(),
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "model_dir": str(self.model_dir),
        }


@dataclass(frozen=True)
class QuickstartJob:
    """What quickstart reads, unpacked from params once: the data, model, train and evaluate
    sections and the folder paths resolve in."""

    data: DataParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    root: Path

    @classmethod
    def from_params(cls, params: Params) -> QuickstartJob:
        return cls(params.data, params.model, params.train, params.evaluate, params.root)


def run_quickstart(job: QuickstartJob, out_dir: Path, progress: bool = True) -> QuickstartResult:
    """The pipeline's own split (a hash of each sample's key), so quickstart's test metrics
    are on exactly the examples `evaluate` scores after `stage` and `train`."""
    data = load_source(job.data, job.root)
    d = job.data
    plan = plan_splits(data.keys, d.val_fraction, d.test_fraction, d.split)
    if not plan["val"] or not plan["test"]:
        raise PipelineError(
            "quickstart needs a validation and a test split; set data.val_fraction and "
            "data.test_fraction above 0"
        )
    x = torch.from_numpy(data.x)
    train_x, val_x, test_x = (x[np.asarray(plan[s], dtype=np.int64)] for s in SPLITS)

    model = build_model(job.model.to_config(tuple(data.x.shape[1:])), seed=job.train.seed)
    cfg = job.train.to_config()
    bar = tqdm(total=cfg.epochs, desc="train", unit="epoch", disable=not progress)

    def on_epoch(rec) -> None:
        bar.update(1)
        # The same words as train's bar.
        bar.set_postfix({"train": f"{rec.train_loss:.3f}", "val -ELBO": f"{rec.val_neg_elbo:.3f}"})

    result = fit(model, train_x, val_x, cfg, on_epoch_end=on_epoch)
    bar.close()
    metrics = evaluate(model, test_x, iw_k=job.evaluate.iw_k, seed=job.evaluate.seed)
    model_dir = save_model(model, out_dir / "model", extra={"best_epoch": result.best_epoch})
    return QuickstartResult(metrics, result.best_epoch, len(result.history), model_dir)
