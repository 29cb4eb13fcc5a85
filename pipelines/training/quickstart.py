"""Train and evaluate a model in-process on a data source held in memory: no Ray, no services.

The fastest way to try a model config; the full pipeline (`retrain`) adds shards, Ray, MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipelines.data.sources import load_source
from pipelines.params import Params
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


def split_80_20(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(0.8 * n))
    return order[:cut], order[cut:]


def run_quickstart(params: Params, out_dir: Path, progress: bool = True) -> QuickstartResult:
    data = load_source(params.data, params.root)
    train_idx, test_idx = split_80_20(len(data.x), params.train.seed)
    x = torch.from_numpy(data.x)
    # Early stopping needs a validation set that is not the test set: carve it from train.
    n_val = max(1, int(round(params.data.val_fraction * len(train_idx))))
    val_x, train_x = x[train_idx[:n_val]], x[train_idx[n_val:]]
    test_x = x[test_idx]

    model = build_model(params.model.to_config(tuple(data.x.shape[1:])), seed=params.train.seed)
    cfg = params.train.to_config()
    bar = tqdm(total=cfg.epochs, desc="train", unit="epoch", disable=not progress)

    def on_epoch(rec) -> None:
        bar.update(1)
        bar.set_postfix(train=f"{rec.train_loss:.2f}", val_neg_elbo=f"{rec.val_neg_elbo:.2f}")

    result = fit(model, train_x, val_x, cfg, on_epoch_end=on_epoch)
    bar.close()
    metrics = evaluate(model, test_x, iw_k=params.evaluate.iw_k, seed=params.evaluate.seed)
    model_dir = save_model(model, out_dir / "model", extra={"best_epoch": result.best_epoch})
    return QuickstartResult(metrics, result.best_epoch, len(result.history), model_dir)
