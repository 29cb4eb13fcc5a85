"""beta-VAE sweep on sprites: how reconstruction trades against disentanglement (MIG).

A call of `vae-pipeline sweep`: it stages the first --size sprites into a workspace of its own
(--workdir, default a temporary folder; the pipeline's key-hash split, 70/10/20), then sweeps
`--grid model.beta=...` with the `sprites-beta-vae` preset (conv auto depth, 10 latents,
Bernoulli decoder), the same seed and epoch budget for every beta, on Ray Tune, with
`--evaluate-all`: every trial's MLflow child run holds its test reconstruction NLL, KL and the
Mutual Information Gap of its posterior means against the five known factors. Prints one JSON
line per beta, read back from those child runs, then the sweep's best by validation -ELBO and
the gate's decision.

Run on demand: `.venv/bin/python benchmarks/beta_sweep.py [--betas 1 4 8] [--size N] [--epochs E]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _vae_pipeline(args: list[str]) -> dict:
    """One command's --json document; its progress goes to this stderr."""
    cmd = [sys.executable, "-m", "pipelines.entry", *args, "--json"]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    doc = json.loads(proc.stdout)
    if proc.returncode != 0:
        sys.exit(f"{args[0]} failed: {doc.get('error')}")
    return doc


def _settings(work: Path, args: argparse.Namespace) -> list[str]:
    sets = [
        f"data.size={args.size}", f"data.shards_dir={work / 'shards'}",
        f"data.cache_dir={work / 'raw'}", f"outputs_dir={work / 'outputs'}",
        f"cluster.storage_path={work / 'runs'}", f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        "register.name=sprites-beta-vae", f"train.epochs={args.epochs}",
        "train.early_stopping_patience=null", "train.seed=0",
        "evaluate.iw_k=0",  # reconstruction, KL and MIG are the point; IW k=1000 costs minutes
    ]  # fmt: skip
    return ["--params", str(REPO / "params.yaml"), "--preset", "sprites-beta-vae",
            *[a for s in sets for a in ("--set", s)]]  # fmt: skip


def _row(client, trial: dict, args: argparse.Namespace) -> dict:
    run = client.get_run(trial["mlflow_run_id"])
    m = run.data.metrics
    return {
        "benchmark": "beta_sweep",
        "beta": float(run.data.params["model.beta"]),
        "data": f"sprites, first {args.size} grid indices, 64x64, test {int(m['test_n_examples'])}",
        "likelihood": run.data.tags.get("likelihood"),
        "units": "nats per example",
        "test_recon_nll": round(m["test_recon_nll"], 2),
        "test_kl": round(m["test_kl"], 2),
        "test_neg_elbo": round(m["test_neg_elbo"], 2),
        "active_units": int(m["test_active_units"]),
        "mig": round(m["test_mig"], 3) if "test_mig" in m else None,
        "val_neg_elbo": round(trial["val_neg_elbo"], 2),
        "epochs": args.epochs,
        "mlflow_run_id": trial["mlflow_run_id"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--betas", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--size", type=int, default=10_000, help="sprites to stage")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args()
    import mlflow

    work = args.workdir or Path(tempfile.mkdtemp(prefix="beta-sweep-"))
    settings = _settings(work.resolve(), args)
    _vae_pipeline(["stage", *settings])
    grid = ",".join(f"{b:g}" for b in args.betas)
    swept = _vae_pipeline(["sweep", *settings, "--grid", f"model.beta={grid}", "--evaluate-all"])
    client = mlflow.MlflowClient(f"sqlite:///{work.resolve() / 'mlflow.db'}")
    for trial in swept["trials"]:
        if trial["status"] == "finished":
            print(json.dumps(_row(client, trial, args)), flush=True)
    best = {k: swept[k] for k in ("best_overrides", "best_val_neg_elbo", "decision", "name")}
    print(json.dumps({"benchmark": "beta_sweep", "best": best}), flush=True)


if __name__ == "__main__":
    main()
