"""GPU check: samples/s of the conv VAE on 64x64 RGB sprites, trained
  (1) by a bare PyTorch loop over a uint8 tensor already on the GPU, and
  (2) by 1 Ray Train worker (nccl backend, use_gpu) reading the same sprites, staged as shards,
      through our loader (SHA-256 check, tar parsing, shuffle buffer, host-to-device copy),
each in fp32 and in bf16 autocast, timed over a fixed number of steps after warm-up steps.
Prints one JSON line with each rate and the ratio Ray/bare per precision; progress goes
to stderr.

The model is the conv VAE with automatic depth (conv_channels [], so 64x64 -> a 4x4 grid);
both paths run vae.train_one_epoch, the step the pipeline runs.

Without CUDA it prints {"cuda": false, "note": ...} and exits 0 at once, without starting Ray
or rendering anything.

Run on demand: `.venv/bin/python benchmarks/gpu_check.py [--samples 16384 --batch-size 256
--warmup-steps 20 --steps 200 --loader-workers 4]`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipelines.data.staging import StageJob

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
NO_CUDA = {"cuda": False, "note": "no CUDA device: the GPU path is untested here"}
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--samples", type=int, default=16384, help="sprites rendered and staged")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--warmup-steps", type=int, default=20, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    parser.add_argument(
        "--loader-workers", type=int, default=4, help="DataLoader processes of the Ray worker"
    )
    parser.add_argument("--latent-dim", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=256, help="width of the conv net's Linear")
    return parser.parse_args(argv)


def progress(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def rgb_sprites(n: int, seed: int = 0) -> Any:
    """uint8 (n, 3, 64, 64): each binary sprite painted one random bright colour on black."""
    import numpy as np

    from pipelines.data.sources import sprites

    grey = sprites.render(sprites.sample_indices(n, seed))[:, None].astype(np.uint16)
    colour = np.random.default_rng(seed).integers(64, 256, (n, 3, 1, 1), dtype=np.uint16)
    return (grey * colour // 255).astype(np.uint8)


def stage(x: Any, tmp: Path, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Stage x as shards under tmp -> (absolute shards folder, the model config as a dict)."""
    import numpy as np

    from pipelines.data.staging import stage_shards
    from pipelines.params_file import load_params

    np.save(tmp / "x.npy", x)
    params = load_params(
        REPO / "params.yaml",
        ["data.source=array", f"data.path={tmp / 'x.npy'}", f"data.shards_dir={tmp / 'shards'}",
         "data.val_fraction=0.05", "data.test_fraction=0.05", "data.shard_size=1024",
         f"data.min_shards_per_split={max(2, args.loader_workers)}",
         f"outputs_dir={tmp / 'out'}", "model.arch=conv", "model.conv_channels=[]",
         f"model.hidden=[{args.hidden}]", f"model.latent_dim={args.latent_dim}"],
    )  # fmt: skip
    staged = stage_shards(StageJob.from_params(params), progress=False)
    progress(f"staged {staged.samples} samples as shards in {tmp / 'shards'}")
    return str(tmp / "shards"), params.model.to_config(tuple(x.shape[1:])).to_dict()


def timed_steps(
    model: torch.nn.Module,
    batches: Iterator[torch.Tensor],
    warmup: int,
    steps: int,
    dtype: torch.dtype | None,
) -> float:
    """samples/s of `steps` training steps taken after `warmup` untimed ones, on one device."""
    from vae import StepRuntime, TrainConfig
    from vae.train import make_optimizer, train_one_epoch

    cfg = TrainConfig()
    optimizer = make_optimizer(model, cfg)
    runtime = StepRuntime(dtype)
    train_one_epoch(model, optimizer, itertools.islice(batches, warmup), 0, 1.0, cfg, runtime)
    torch.cuda.synchronize()
    start = time.perf_counter()
    _, n = train_one_epoch(model, optimizer, itertools.islice(batches, steps), 1, 1.0, cfg, runtime)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def bare_rates(model_config: dict, x: Any, args: argparse.Namespace) -> dict[str, float]:
    """The ceiling: no loader, no Ray, random batches indexed from data already on the GPU."""
    from vae import ModelConfig, build_model

    device = torch.device("cuda")
    data = torch.from_numpy(x).to(device)
    gen = torch.Generator(device).manual_seed(0)

    def batches():
        while True:
            idx = torch.randint(len(data), (args.batch_size,), device=device, generator=gen)
            yield data[idx].float().div_(255.0)

    rates = {}
    for name, dtype in PRECISIONS.items():
        model = build_model(ModelConfig.from_dict(model_config), seed=0).to(device)
        rates[name] = timed_steps(model, batches(), args.warmup_steps, args.steps, dtype)
        progress(f"bare loop {name}: {rates[name]:.0f} samples/s")
    return rates


def ray_worker(config: dict[str, Any]) -> dict[str, float]:
    """The Ray Train worker: the same steps on batches from our shard loader."""
    import ray.train
    import ray.train.torch

    from pipelines.data.shards.loader import make_loader
    from vae import ModelConfig, build_model

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()

    def batches():
        for epoch in itertools.count():
            loader = make_loader(
                config["shards_dir"], "train", config["batch_size"], rank=ctx.get_world_rank(),
                world_size=ctx.get_world_size(), num_workers=config["loader_workers"],
                epoch=epoch, seed=0,
            )  # fmt: skip
            for batch in loader:
                yield batch["x"].to(device, non_blocking=True)

    rates = {}
    for name, dtype in PRECISIONS.items():
        model = build_model(ModelConfig.from_dict(config["model"]), seed=0)
        model = ray.train.torch.prepare_model(model)
        rates[name] = timed_steps(model, batches(), config["warmup"], config["steps"], dtype)
    return rates  # rank 0's return value reaches the driver (reported metrics need a checkpoint)


def ray_rates(model_config: dict, shards_dir: str, tmp: Path, args: argparse.Namespace):
    """1 Ray Train worker holding the GPU, its process group on nccl."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cpus = 1 + args.loader_workers
    # A Ray of our own, sized so the worker always fits: Ray Train waits forever on a request
    # no node can satisfy, which would spend the whole device lease saying nothing.
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, cpus),
        num_gpus=torch.cuda.device_count(),
        include_dashboard=False,
    )
    try:
        trainer = TorchTrainer(
            ray_worker,
            train_loop_config={
                "model": model_config,
                "shards_dir": shards_dir,
                "batch_size": args.batch_size,
                "loader_workers": args.loader_workers,
                "warmup": args.warmup_steps,
                "steps": args.steps,
            },
            torch_config=TorchConfig(backend="nccl"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=1, use_gpu=True, resources_per_worker={"CPU": cpus}
            ),
            run_config=ray.train.RunConfig(
                name="gpu-check",
                storage_path=str(tmp / "runs"),
                # A failure is the answer here: retries would only repeat it.
                failure_config=ray.train.FailureConfig(max_failures=0, controller_failure_limit=0),
            ),
        )
        rates = trainer.fit().return_value
    finally:
        ray.shutdown()
    for name, rate in rates.items():
        progress(f"ray 1 worker (nccl) {name}: {rate:.0f} samples/s")
    return rates


def gpu_check(args: argparse.Namespace) -> dict[str, Any]:
    from vae import ModelConfig, build_model
    from vae.conv_layout import conv_channels_for

    started = time.perf_counter()
    progress(f"rendering {args.samples} 64x64 RGB sprites")
    x = rgb_sprites(args.samples)
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        shards_dir, model_config = stage(x, Path(tmp), args)
        bare = bare_rates(model_config, x, args)
        ray = ray_rates(model_config, shards_dir, Path(tmp), args)
    model = build_model(ModelConfig.from_dict(model_config))
    channels = conv_channels_for(model.config.conv_channels, model.config.input_shape)
    return {
        "benchmark": "gpu_check",
        "cuda": True,
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "model": f"vae conv, automatic channels {list(channels)} (64x64 -> 4x4 grid), "
        f"hidden [{args.hidden}], latent {args.latent_dim}, 64x64 RGB sprites",
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup_steps,
        "timed_steps": args.steps,
        "loader_workers": args.loader_workers,
        "samples_per_s_bare_loop": {k: round(v, 1) for k, v in bare.items()},
        "samples_per_s_ray_1_worker_nccl": {k: round(v, 1) for k, v in ray.items()},
        "ratio_ray_over_bare": {k: round(ray[k] / bare[k], 3) for k in PRECISIONS},
        "speedup_bf16_over_fp32": {
            "bare_loop": round(bare["bf16"] / bare["fp32"], 3),
            "ray_1_worker": round(ray["bf16"] / ray["fp32"], 3),
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps(NO_CUDA))
        return 0
    print(json.dumps(gpu_check(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
