"""beta-VAE sweep on sprites: how reconstruction trades against disentanglement (MIG).

Trains the conv beta-VAE of the `sprites-beta-vae` preset (automatic conv depth, 10 latents,
Bernoulli decoder) for each beta on the same sprites (their first --size grid indices, 80/20
split) with the same seed and epoch budget, then reports on the held-out 20%: reconstruction
NLL and KL (nats per example, Bernoulli) and the Mutual Information Gap of the posterior means
against the five known factors. Prints one JSON line per beta.

Run on demand: `.venv/bin/python benchmarks/beta_sweep.py [--betas 1 4 8] [--size N] [--epochs E]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from pipelines.data.sources.sprites import FACTOR_NAMES, factors_of, render, sample_indices
from vae import ModelConfig, TrainConfig, build_model, evaluate, fit, mutual_information_gap


def _data(size: int):
    idx = sample_indices(size)
    x = torch.from_numpy(render(idx)[:, None].astype(np.float32) / 255.0)
    n_test = size // 5
    return x[n_test:], x[:n_test], factors_of(idx)[:n_test]


def _run(beta: float, data, args: argparse.Namespace) -> dict:
    train, test, test_factors = data
    n_val = max(1, len(train) // 10)
    cfg = ModelConfig(
        kind="vae" if beta == 1 else "beta_vae", arch="conv", input_shape=(1, 64, 64),
        conv_channels=(), latent_dim=10, hidden=(256,), likelihood="bernoulli", beta=beta,
    )  # fmt: skip
    model = build_model(cfg, seed=0)
    start = time.perf_counter()
    fit(model, train[n_val:], train[:n_val],
        TrainConfig(epochs=args.epochs, batch_size=128, seed=0, early_stopping_patience=None))  # fmt: skip
    m = evaluate(model, test, batch_size=256)
    mu, _ = model.embed(test)
    mig = mutual_information_gap(mu.numpy(), test_factors)
    return {
        "benchmark": "beta_sweep",
        "beta": beta,
        "data": f"sprites, first {args.size} grid indices, 64x64, test {len(test)}",
        "likelihood": m.likelihood,
        "units": "nats per example",
        "test_recon_nll": round(m.recon_nll, 2),
        "test_kl": round(m.kl, 2),
        "test_neg_elbo": round(m.neg_elbo, 2),
        "active_units": m.active_units,
        "mig": round(float(mig.mig), 3),
        "mig_per_factor": dict(
            zip(FACTOR_NAMES, (round(float(g), 3) for g in mig.gaps), strict=True)
        ),
        "epochs": args.epochs,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--betas", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--size", type=int, default=10_000, help="sprites (80%% train)")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    data = _data(args.size)
    for beta in args.betas:
        print(f"training beta={beta:g} ...", file=sys.stderr, flush=True)
        print(json.dumps(_run(beta, data, args)), flush=True)


if __name__ == "__main__":
    main()
