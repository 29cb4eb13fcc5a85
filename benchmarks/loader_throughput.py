"""Loader-throughput benchmark: samples/s reading staged WebDataset shards vs the same tensors
shuffled and batched from memory. Prints one JSON line.

The shard path does everything training gets from it: SHA-256 check of every shard, tar parsing,
.npy decoding, a seeded shuffle buffer and exact re-batching; the memory path only indexes a
tensor, so the ratio is the full cost of streaming from disk (warm page cache).

Run on demand: `.venv/bin/python benchmarks/loader_throughput.py [--samples 20000 --side 28
--workers 0 2]`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.data.loader import make_loader
from pipelines.data.staging import stage_shards
from pipelines.params import load_params


def _rate(run, repeats: int) -> float:
    """Best samples/s over a few epochs (the first also warms the page cache)."""
    best = 0.0
    for epoch in range(repeats):
        start = time.perf_counter()
        n = run(epoch)
        best = max(best, n / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--side", type=int, default=28, help="images are 1 x side x side")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.samples, args.side, args.side), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "x.npy", x)
        params = load_params(
            None,
            [
                "data.source=array",
                f"data.path={Path(tmp) / 'x.npy'}",
                f"data.shards_dir={Path(tmp) / 'shards'}",
                f"data.shard_size={args.shard_size}",
                "data.val_fraction=0",
                "data.test_fraction=0",
            ],
        )
        start = time.perf_counter()
        staged = stage_shards(params, progress=False)
        stage_s = time.perf_counter() - start

        def shards(workers: int):
            def run(epoch: int) -> int:
                loader = make_loader(
                    staged.shards_dir, "train", args.batch_size, num_workers=workers, epoch=epoch
                )
                return sum(batch["x"].shape[0] for batch in loader)

            return run

        tensor = torch.from_numpy(x[:, None].astype(np.float32) / 255.0)

        def memory(epoch: int) -> int:
            order = torch.randperm(len(tensor), generator=torch.Generator().manual_seed(epoch))
            n = 0
            for start in range(0, len(tensor), args.batch_size):
                n += tensor[order[start : start + args.batch_size]].shape[0]
            return n

        by_workers = {w: _rate(shards(w), args.repeats) for w in args.workers}
        mem = _rate(memory, args.repeats)
    best = max(by_workers.values())
    print(
        json.dumps(
            {
                "benchmark": "loader_throughput",
                "samples": args.samples,
                "shape": [1, args.side, args.side],
                "batch_size": args.batch_size,
                "shard_size": args.shard_size,
                "shards": staged.shards["train"],
                "stage_s": round(stage_s, 2),
                "samples_per_s_shards": round(best),
                "samples_per_s_shards_by_workers": {
                    str(w): round(r) for w, r in by_workers.items()
                },
                "samples_per_s_memory": round(mem),
                "ratio": round(best / mem, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
