"""Embedding-throughput benchmark: samples/s of
  (a) the embed job's Ray Data path (array source -> encoder actors -> one Parquet file),
      end to end: actor start-up, transfer and writing included, Ray start-up excluded;
  (b) a bare in-process torch loop over the same in-memory array (inference only),
with the same model, batch size and CPU count. Prints one JSON line; ratio = a / b. The job's
encoder is what embed runs: the model logged and registered as `register` does (not timed),
loaded through MLflow (its pt2 program).
With --shards, also (c) the same images staged as shards (uint8, --shard-size per shard) and
embedded from the shards folder: each shard read and SHA-256-checked in Ray's tasks.

Run on demand: `.venv/bin/python benchmarks/embed_throughput.py [--samples 20000 --side 28
--shards]`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.data.staging import StageJob
from pipelines.jobs.embed import write_embeddings
from pipelines.jobs.embed_sources import open_source
from pipelines.params import EmbedParams, Params
from pipelines.paths import layout
from pipelines.registry import models as registry
from vae import ModelConfig, build_model, save_model


def plain_torch(model, x: np.ndarray, batch_size: int) -> float:
    data = torch.from_numpy(x)
    start = time.perf_counter()
    for i in range(0, len(data), batch_size):
        model.embed(data[i : i + batch_size])
    return len(data) / (time.perf_counter() - start)


def registered_encoder(model, x: np.ndarray, tmp: Path) -> registry.RegisteredModel:
    """model logged and registered in a SQLite store under tmp, loaded back as embed loads it."""
    import mlflow

    from pipelines import tracking
    from pipelines.registry.export import log_models

    store = tracking.Store(f"sqlite:///{tmp / 'mlflow.db'}", "benchmark", "benchmark")
    client = tracking.client(store)
    experiment = tracking.experiment_id(store)
    run = client.create_run(experiment)
    mlflow.set_tracking_uri(store.uri)  # log_model logs to the global store and experiment
    mlflow.set_experiment(experiment_id=experiment)
    save_model(model, tmp / "model")
    uri, model_id = log_models(model, run.info.run_id, tmp / "model", torch.from_numpy(x[:8]))[
        "encoder"
    ]
    reg = registry.ModelRegistry(store, "bench")
    client.create_registered_model(reg.model_name("encoder"))
    client.create_model_version(
        reg.model_name("encoder"), source=uri, run_id=run.info.run_id, model_id=model_id
    )
    return registry.load_registered(reg, "encoder", "1")[0]


def _from_shards(
    args, x: np.ndarray, tmp: Path, encoder: registry.RegisteredModel, ep: EmbedParams
) -> float:
    """Stage x into shards (not timed), then samples/s of embed from that folder."""
    from pipelines.data.staging import stage_shards
    from pipelines.params_file import load_params

    np.save(tmp / "u8.npy", (x * 255).round().astype(np.uint8))
    params = load_params(
        None,
        [
            "data.source=array", f"data.path={tmp / 'u8.npy'}", f"data.shards_dir={tmp / 'shards'}",
            f"data.shard_size={args.shard_size}", "data.val_fraction=0", "data.test_fraction=0",
        ],
    )  # fmt: skip
    staged = stage_shards(StageJob.from_params(params), progress=False)
    src = open_source(layout(Params(root=tmp)), str(staged.shards_dir), "all", args.concurrency)
    start = time.perf_counter()
    n, _ = write_embeddings(src, encoder, tmp / "shards.parquet", False, ep, progress=False)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--side", type=int, default=28, help="images are 1 x side x side")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--shards", action="store_true", help="also embed from staged shards")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    args = parser.parse_args()

    import ray

    rng = np.random.default_rng(0)
    # uint8-valued, so the shards (stored as uint8) hold exactly these images
    x = rng.integers(0, 256, (args.samples, 1, args.side, args.side)).astype(np.float32) / 255
    model = build_model(
        ModelConfig(input_shape=(1, args.side, args.side), latent_dim=args.latent), seed=0
    ).eval()
    ep = EmbedParams(batch_size=args.batch_size, concurrency=args.concurrency)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.save(tmp / "x.npy", x)
        encoder = registered_encoder(model, x, tmp)
        t0 = time.perf_counter()
        ray.init(
            address="local", num_cpus=args.concurrency, include_dashboard=False, log_to_driver=False
        )
        ray_init_s = time.perf_counter() - t0
        src = open_source(layout(Params(root=tmp)), str(tmp / "x.npy"), "all", args.concurrency)
        start = time.perf_counter()
        n, _ = write_embeddings(src, encoder, tmp / "out.parquet", False, ep, progress=False)
        ray_rate = n / (time.perf_counter() - start)
        shards_rate = _from_shards(args, x, tmp, encoder, ep) if args.shards else None
        ray.shutdown()
    torch.set_num_threads(args.concurrency)  # the same CPUs as the actors had
    torch_rate = plain_torch(model, x, args.batch_size)
    print(
        json.dumps(
            {
                "benchmark": "embed_throughput",
                "samples": args.samples,
                "shape": [1, args.side, args.side],
                "batch_size": args.batch_size,
                "cpus": args.concurrency,
                "samples_per_s_ray_data": round(ray_rate, 1),
                "samples_per_s_plain_torch": round(torch_rate, 1),
                "ratio_ray_over_torch": round(ray_rate / torch_rate, 3),
                **(
                    {"samples_per_s_ray_data_from_shards": round(shards_rate, 1)}
                    if shards_rate
                    else {}
                ),
                "ray_init_s": round(ray_init_s, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
