"""Model-quality benchmark: held-out -ELBO and IW NLL (k=1000) on digits, fixed 80/20 split.

Run on demand: `.venv/bin/python benchmarks/model_quality.py [--epochs N]`. Prints one JSON line
per configuration so later changes can be compared; every figure is nats per example under the
likelihood named in the line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from pipelines.params import load_params
from pipelines.training.quickstart import run_quickstart

CONFIGS = {
    "vae-gaussian-sigma0.1": [],
    "vae-bernoulli-binarized": ["model.likelihood=bernoulli", "data.binarize=true"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    args = parser.parse_args()
    for name, overrides in CONFIGS.items():
        if args.epochs is not None:
            overrides = [*overrides, f"train.epochs={args.epochs}"]
        params = load_params(args.params, [*overrides, "evaluate.iw_k=1000"])
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            result = run_quickstart(params, Path(tmp), progress=False)
        m = result.metrics
        print(
            json.dumps(
                {
                    "benchmark": "model_quality",
                    "config": name,
                    "data": "sklearn digits /16, 80/20 split (seed 0)",
                    "likelihood": m.likelihood,
                    "units": "nats per example",
                    "test_neg_elbo": round(m.neg_elbo, 4),
                    "test_iw_nll_k1000": round(m.iw_nll, 4),
                    "test_recon_nll": round(m.recon_nll, 4),
                    "test_kl": round(m.kl, 4),
                    "active_units": m.active_units,
                    "best_epoch": result.best_epoch,
                    "epochs_run": result.epochs_run,
                    "seconds": round(time.perf_counter() - start, 2),
                }
            )
        )


if __name__ == "__main__":
    main()
