"""Does the pipeline train as good a model as a bare PyTorch loop? Fashion-MNIST (Debian's
dataset-fashion-mnist, official split) is staged once; the same model config, batch size,
learning rate, seed and epochs then train
  (a) through the pipeline: `train` on one Ray Train worker reading the shards (best epoch by
      validation -ELBO, as it exports), and
  (b) in a bare single-process loop: the train split in memory, shuffled batches, Adam, the
      model's own loss, backward, step, every epoch; the last epoch kept.
Both models are scored the same way, on the same first --test examples of the test split:
-ELBO and the importance-weighted NLL (k = --iw-k), in nats per example. Prints one JSON
document; the goal is the pipeline within 1.5 nats IW NLL of the bare loop.

Run on demand: `.venv/bin/python benchmarks/quality_vs_bare_loop.py [--epochs 10]`.
Needs `apt-get install dataset-fashion-mnist`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from pipelines.data.staging import StageJob
from pipelines.training.job import TrainJob

REPO = Path(__file__).resolve().parents[1]
DATA = ["data.source=fashion_mnist", "data.image_size=[28,28]", "data.split=official"]


def _split(shards: Path, split: str, limit: int | None = None) -> torch.Tensor:
    from pipelines.data.shards.loader import make_loader

    parts, n = [], 0
    for batch in make_loader(shards, split, 1024, shuffle=False, equalize=False):
        parts.append(torch.as_tensor(batch["x"]))
        n += len(parts[-1])
        if limit is not None and n >= limit:
            break
    x = torch.cat(parts)
    return x if limit is None else x[:limit]


def bare_loop(params, train_x: torch.Tensor, epochs: int):
    """The textbook loop: nothing of the pipeline's but the model."""
    from vae import build_model
    from vae.train import make_optimizer

    model = build_model(params.model.to_config(tuple(train_x.shape[1:])), seed=params.train.seed)
    opt = make_optimizer(model, params.train.to_config())
    gen = torch.Generator().manual_seed(params.train.seed)
    torch.manual_seed(params.train.seed)
    bs = params.train.batch_size
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=gen)
        for start in range(0, len(train_x), bs):
            loss = model(train_x[order[start : start + bs]], kl_weight=1.0).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--test", type=int, default=2000, help="test examples scored")
    parser.add_argument("--iw-k", type=int, default=1000)
    args = parser.parse_args()

    from pipelines.data.staging import stage_shards
    from pipelines.params_file import load_params
    from pipelines.training.driver import train_model
    from vae import evaluate, load_model

    work = Path(tempfile.mkdtemp(prefix="vae-quality-"))
    sets = [*DATA, f"train.epochs={args.epochs}", "cluster.num_workers=1",
            "train.early_stopping_patience=null",
            f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}"]  # fmt: skip
    (work / "params.yaml").write_text((REPO / "params.yaml").read_text())
    params = load_params(work / "params.yaml", sets)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    stage_shards(StageJob.from_params(params), progress=False)
    shards = params.resolve(params.data.shards_dir)

    started = time.monotonic()
    result = train_model(TrainJob.from_params(params), progress=False)
    pipeline_s = time.monotonic() - started
    pipeline = load_model(result.model_dir).eval()

    train_x = _split(shards, "train")
    started = time.monotonic()
    bare = bare_loop(params, train_x, args.epochs)
    bare_s = time.monotonic() - started

    test_x = _split(shards, "test", args.test)
    scores = {}
    for name, model in (("pipeline", pipeline), ("bare_loop", bare)):
        res = evaluate(model, test_x, iw_k=args.iw_k, seed=0)
        scores[name] = {"neg_elbo": round(res.neg_elbo, 2), "iw_nll": round(res.iw_nll, 2)}
    gap = scores["pipeline"]["iw_nll"] - scores["bare_loop"]["iw_nll"]
    print(json.dumps({
        "benchmark": "quality_vs_bare_loop", "data": "fashion_mnist (official split, 28x28)",
        "epochs": args.epochs, "train_examples": len(train_x), "test_examples": len(test_x),
        "iw_k": args.iw_k, "likelihood": pipeline.likelihood.describe(),
        "pipeline": scores["pipeline"] | {"train_s": round(pipeline_s, 1),
                                          "best_epoch": result.best_epoch},
        "bare_loop": scores["bare_loop"] | {"train_s": round(bare_s, 1)},
        "iw_nll_gap_nats": round(gap, 2), "goal_nats": 1.5,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
