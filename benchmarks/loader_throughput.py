"""Loader-throughput benchmark: samples/s reading staged WebDataset shards vs the same tensors
shuffled and batched from memory. Prints one JSON line.

The shard path does everything training gets from it: SHA-256 check of every shard, tar parsing,
.npy decoding, a seeded shuffle buffer and exact re-batching; the memory path only indexes a
tensor, so the ratio is the full cost of streaming from disk (warm page cache).

With --s3 the same shards are also staged into an S3-compatible server (moto's, started here on
127.0.0.1) and read from there. The hand-written tar parser is timed against the standard
library's tarfile on the same (decompressed) shards: it stays only while it pays.

Run on demand: `.venv/bin/python benchmarks/loader_throughput.py [--samples 20000 --side 28
--channels 1 --workers 0 2 --s3]`; 64x64 RGB: `--side 64 --channels 3`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.data.shards.loader import make_loader
from pipelines.data.staging import StageJob, stage_shards
from pipelines.params_file import load_params


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
    parser.add_argument("--channels", type=int, choices=[1, 3], default=1)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--s3", action="store_true", help="also read from a local S3 server")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        x = _images(args.samples, args.side, args.channels)
        np.save(Path(tmp) / "x.npy", x)
        _measure(args, x, f"{Path(tmp) / 'shards'}", Path(tmp), "local")
        if args.s3:
            with _s3_server(Path(tmp)):
                _measure(args, x, "s3://bench/shards", Path(tmp), "s3")


def _images(n: int, side: int, channels: int) -> np.ndarray:
    """Smooth random blobs (compressible like photos, unlike pure noise), uint8 (N, H, W[, C])."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (n, side // 4, side // 4, channels), dtype=np.uint8)
    x = small.repeat(4, axis=1).repeat(4, axis=2)
    return x[..., 0] if channels == 1 else x


def _s3_server(tmp: Path):
    """moto's S3 server on 127.0.0.1 with this process's AWS_* settings pointing at it."""
    import contextlib
    import os
    import socket
    import subprocess
    import sys
    import urllib.request

    @contextlib.contextmanager
    def run():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        exe = str(Path(sys.executable).parent / "moto_server")
        proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.environ.update(
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
        )  # fmt: skip
        try:
            for _ in range(200):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            import boto3

            boto3.client("s3").create_bucket(Bucket="bench")
            yield
        finally:
            proc.terminate()
            proc.wait(10)

    return run()


def _parser_rates(shards_dir: str) -> dict[str, int]:
    """Samples/s parsing the decompressed shards: our ustar reader vs tarfile's."""
    import gzip
    import io

    from webdataset.tariterators import group_by_keys, tar_file_expander

    from pipelines.data.shards.manifest import read_manifest
    from pipelines.data.shards.reader import _grouped, _plain_tar_members
    from pipelines.storage import location

    entries = read_manifest(shards_dir).shards("train")
    blobs = [gzip.decompress(location(shards_dir).joinpath(e.name).read_bytes()) for e in entries]
    n = sum(e.samples for e in entries)

    def ours() -> int:
        return sum(len(_grouped(_plain_tar_members(b), "u")) for b in blobs)

    def std() -> int:
        return sum(
            len(list(group_by_keys(tar_file_expander([{"url": "u", "stream": io.BytesIO(b)}]))))
            for b in blobs
        )

    rates = {}
    for name, fn in (("hand_written", ours), ("tarfile", std)):
        start = time.perf_counter()
        assert fn() == n
        rates[name] = round(n / (time.perf_counter() - start))
    return rates


def _measure(args, x: np.ndarray, shards_dir: str, tmp: Path, where: str) -> None:
    """Stage x into shards_dir, then samples/s through the loader (0 and N workers) and from
    memory; one JSON line."""
    params = load_params(
        None,
        [
            "data.source=array",
            f"data.path={tmp / 'x.npy'}",
            f"data.shards_dir={shards_dir}",
            f"data.shard_size={args.shard_size}",
            "data.val_fraction=0",
            "data.test_fraction=0",
        ],
    )
    start = time.perf_counter()
    staged = stage_shards(StageJob.from_params(params), progress=False)
    stage_s = time.perf_counter() - start

    def shards(workers: int):
        def run(epoch: int) -> int:
            loader = make_loader(
                staged.shards_dir, "train", args.batch_size, num_workers=workers, epoch=epoch
            )
            return sum(batch["x"].shape[0] for batch in loader)

        return run

    tensor = torch.from_numpy(x.astype(np.float32) / 255.0)

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
                "shards_on": where,
                "samples": args.samples,
                "shape": [args.channels, args.side, args.side],
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
                "tar_parser_samples_per_s": _parser_rates(str(staged.shards_dir)),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
