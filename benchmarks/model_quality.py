"""Model-quality benchmark: plain VAE vs IWAE (k=5, 50) vs the best preset on binarised digits.

Every configuration trains the same network (params.yaml's model.hidden / latent_dim) for the
same epoch budget (train.epochs, early stopping on the validation score of its own objective)
on the pipeline's own split, and is scored on the same held-out test examples by -ELBO and the
importance-weighted NLL with --iw-k samples (default 5000). Figures are nats per example under a
Bernoulli decoder. Prints one JSON line per configuration, then a summary line with the goal
(issue 17: the best preset's IW NLL at least 0.5 nats below the plain VAE's).

Run on demand: `.venv/bin/python benchmarks/model_quality.py [--epochs N] [--iw-k K]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from pipelines.params_file import load_params
from pipelines.presets import preset_overrides
from pipelines.training.quickstart import QuickstartJob, run_quickstart

BEST_PRESET = "digits-binary-iwae"
BINARY = ["data.binarize=true", "model.likelihood=bernoulli"]
CONFIGS = {
    "plain-vae": BINARY,
    "iwae-k5": [*BINARY, "model.objective=iwae", "model.mc_samples=5"],
    "iwae-k50": [*BINARY, "model.objective=iwae", "model.mc_samples=50"],
    f"preset:{BEST_PRESET}": preset_overrides(BEST_PRESET),
}
GOAL_NATS = 0.5


def _run(name: str, overrides: list[str], args: argparse.Namespace) -> dict:
    sets = [*overrides, f"evaluate.iw_k={args.iw_k}"]
    if args.epochs is not None:
        sets.append(f"train.epochs={args.epochs}")
    params = load_params(args.params, sets)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_quickstart(QuickstartJob.from_params(params), Path(tmp), progress=False)
    m = result.metrics
    return {
        "benchmark": "model_quality",
        "config": name,
        "objective": m.objective,
        "data": "sklearn digits, binarised at 0.5, the pipeline's split (seed 0)",
        "network": {"hidden": list(params.model.hidden), "latent_dim": params.model.latent_dim},
        "likelihood": m.likelihood,
        "units": "nats per example",
        "test_neg_elbo": round(m.neg_elbo, 4),
        f"test_iw_nll_k{args.iw_k}": round(m.iw_nll, 4),
        "test_kl": round(m.kl, 4),
        "active_units": m.active_units,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Numbers go into docs/benchmarks.md with these settings.",
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    parser.add_argument("--iw-k", type=int, default=5000, help="importance samples for the NLL")
    args = parser.parse_args()
    rows = {}
    for name, overrides in CONFIGS.items():
        print(f"training {name} ...", file=sys.stderr, flush=True)
        rows[name] = _run(name, overrides, args)
        print(json.dumps(rows[name]), flush=True)
    key = f"test_iw_nll_k{args.iw_k}"
    gain = rows["plain-vae"][key] - rows[f"preset:{BEST_PRESET}"][key]
    print(json.dumps({
        "benchmark": "model_quality", "summary": True, "best_preset": BEST_PRESET,
        "iw_nll_gain_over_plain_vae": round(gain, 4), "goal_nats": GOAL_NATS,
        "goal_met": gain >= GOAL_NATS,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
