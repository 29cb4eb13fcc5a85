"""Staging at scale: peak memory, speed and shard bytes per sample at N and 10N images, and
what an append of 10% does to the shards. Prints one JSON line per measurement.

The images are synthetic 28x28 uint8 greyscale (MNIST-sized): scikit-learn's digits, upscaled
and shifted at random with a little noise, so they compress like real scans rather than like
pure noise. Each `vae-pipeline stage` runs in its own process and reports its own peak resident
memory (VmHWM from /proc: unlike ru_maxrss it starts afresh at exec, so the parent's memory
does not leak into the figure), so the N and 10N figures are measured independently.

Run on demand: `.venv/bin/python benchmarks/stage_scale.py [--n 70000 700000]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIDE = 28
CHUNK = 10_000


def _write_images(path: Path, n: int, seed: int = 0) -> None:
    """n synthetic 28x28 uint8 images into a .npy file, written chunk by chunk."""
    from sklearn.datasets import load_digits

    base = np.kron(load_digits().images / 16.0, np.ones((3, 3)))  # 24x24
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, SIDE, SIDE))
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        pick = rng.integers(0, len(base), b - a)
        dy, dx = rng.integers(0, 5, (2, b - a))
        imgs = np.zeros((b - a, SIDE, SIDE))
        for i, (k, y, x) in enumerate(zip(pick, dy, dx, strict=True)):
            imgs[i, y : y + 24, x : x + 24] = base[k]
        imgs += rng.normal(0, 0.03, imgs.shape) * (imgs > 0)
        out[a:b] = np.clip(imgs * 255, 0, 255).astype(np.uint8)
    out.flush()
    del out


# Runs the CLI, then writes this process's peak RSS (kB) to the file named by $PEAK_FILE.
# The console script's own entry (pipelines.entry), as users run it: it leaves Ray before the
# interpreter's exit, whose hook would sleep 0.5 s for worker logs nobody prints.
_WRAPPER = """
import os, sys
from pipelines.entry import main
try:
    code = main()
finally:
    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]
    open(os.environ['PEAK_FILE'], 'w').write(hwm)
sys.exit(code)
"""


def _stage(work: Path, array: Path) -> dict:
    """One `vae-pipeline stage` in its own process: seconds, peak RSS and its JSON result."""
    peak = work / "peak.txt"
    cmd = [
        sys.executable, "-c", _WRAPPER, "stage", "--json", "--quiet",
        "--params", str(work / "params.yaml"),
        "--set", "data.source=array", "--set", f"data.path={array}",
    ]  # fmt: skip
    started = time.perf_counter()
    env = {**os.environ, "PEAK_FILE": str(peak)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"stage failed: {proc.stderr.strip()[-500:]}")
    peak_mb = int(peak.read_text()) / 1024
    return {"seconds": seconds, "peak_rss_mb": peak_mb, "result": json.loads(proc.stdout)}


def _shard_files(shards: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_ino) for p in shards.glob("*.tar.gz")}


def _bytes(shards: Path) -> int:
    return sum(size for size, _ in _shard_files(shards).values())


def _measure(n: int, repo: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "params.yaml").write_text((repo / "params.yaml").read_text())
        array = work / "images.npy"
        _write_images(array, n)
        run = _stage(work, array)
        shards = work / "data" / "shards"
        total = _bytes(shards)
        print(json.dumps({
            "benchmark": "stage", "images": n, "shape": [1, SIDE, SIDE],
            "seconds": round(run["seconds"], 1),
            "samples_per_s": round(n / run["seconds"]),
            "peak_rss_mb": round(run["peak_rss_mb"], 1),
            "shards": sum(run["result"]["shards"].values()),
            "shard_bytes_per_sample": round(total / n, 1),
            "raw_bytes_per_sample": SIDE * SIDE,
            "bytes_vs_raw": round(total / (n * SIDE * SIDE), 3),
        }), flush=True)  # fmt: skip
        _append(work, array, n, shards)


def _append(work: Path, array: Path, n: int, shards: Path) -> None:
    """Append 10% more images (new rows at the end) and stage again."""
    before = {name: size for name, (size, _) in _shard_files(shards).items()}
    hashes = {p.name: p.read_bytes() for p in shards.glob("*.tar.gz")}
    extra = work / "extra.npy"
    _write_images(extra, n // 10, seed=1)
    grown = np.lib.format.open_memmap(
        work / "grown.npy", mode="w+", dtype=np.uint8, shape=(n + n // 10, SIDE, SIDE)
    )
    for a in range(0, n, CHUNK * 10):
        grown[a : min(n, a + CHUNK * 10)] = np.load(array, mmap_mode="r")[
            a : min(n, a + CHUNK * 10)
        ]
    grown[n:] = np.load(extra, mmap_mode="r")
    grown.flush()
    del grown
    array.unlink()
    os.replace(work / "grown.npy", array)
    run = _stage(work, array)
    after = _shard_files(shards)
    same = [
        name for name in before if name in after and (shards / name).read_bytes() == hashes[name]
    ]
    new_bytes = sum(size for name, (size, _) in after.items() if name not in before)
    print(json.dumps({
        "benchmark": "stage-append-10pct", "images": n + n // 10,
        "seconds": round(run["seconds"], 1),
        "peak_rss_mb": round(run["peak_rss_mb"], 1),
        "appended": run["result"]["appended"],
        "shards_before": len(before), "shards_after": len(after),
        "unchanged_fraction": round(len(same) / len(after), 3),
        "new_bytes_fraction": round(new_bytes / sum(s for s, _ in after.values()), 3),
    }), flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[70_000, 700_000])
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    for n in args.n:
        _measure(n, repo)


if __name__ == "__main__":
    main()
