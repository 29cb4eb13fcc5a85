"""The pipeline at scale on real data: stage, train, evaluate and register on Fashion-MNIST (70,000
images from Debian's dataset-fashion-mnist, official split) and on sprites (--sprites images,
64x64), with the default params, on 1 and on 2 Ray workers of a Ray cluster this script starts
(`ray start --head`, so every stage runs as a client of a cluster address, as on a real cluster).

Each worker count stages its own copy of the data (Ray tasks: the same bytes, checked by their
DVC md5). Each stage is one `vae-pipeline` process whose own peak RSS (VmHWM) is the driver's memory.
Prints one JSON document: per dataset and worker count each stage's wall time and peak RSS, the
test -ELBO and IW NLL (with its standard error), and the ratios the scaling goals speak of.

Run on demand: `.venv/bin/python benchmarks/flow_at_scale.py [--epochs 10 --sprites 200000
--datasets fashion_mnist sprites --cpus 2 --until register]`; `--until stage` stages alone. Needs `apt-get install dataset-fashion-mnist`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from stage_scale import _WRAPPER  # noqa: E402 - runs the CLI, writes its peak RSS to $PEAK_FILE

RAY = Path(sys.executable).parent / "ray"
STAGES = ("stage", "train", "evaluate", "register")

DATASETS = {
    "fashion_mnist": [
        "data.source=fashion_mnist",
        "data.image_size=[28,28]",
        "data.split=official",
    ],
    "sprites": ["data.source=sprites", "data.image_size=[64,64]"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            time.sleep(2)  # the GCS answers before the raylet has registered
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the Ray head on port {port} did not start in {timeout:g} s")


def _run(work: Path, stage: str, overrides: list[str], env: dict) -> dict:
    peak = work / f"peak-{stage}.txt"
    cmd = [sys.executable, "-c", _WRAPPER, stage, "--json", "--quiet",
           "--params", str(work / "params.yaml")]  # fmt: skip
    for o in overrides:
        cmd += ["--set", o]
    started = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, check=False, cwd=work,
        env={**env, "PEAK_FILE": str(peak)},
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed: {proc.stdout.strip()[-400:]} {proc.stderr[-400:]}")
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(int(peak.read_text()) / 1024, 1),
        "result": json.loads(proc.stdout),
    }


def _dataset(name: str, args, root: Path, env: dict) -> dict:
    work = root / name
    work.mkdir()
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    base = [*DATASETS[name], f"train.epochs={args.epochs}"]
    if name == "sprites":
        base.append(f"data.size={args.sprites}")
    out: dict = {}
    for workers in args.workers:
        # Each worker count stages its own copy (Ray tasks with a cluster given: the same bytes).
        run = [*base, f"cluster.num_workers={workers}", f"outputs_dir=outputs-{workers}",
               f"cluster.storage_path=runs-{workers}", f"register.name={name}-w{workers}",
               f"data.shards_dir=data/shards-{workers}", f"data.stage_workers={workers}"]  # fmt: skip
        stages = {s: _run(work, s, run, env) for s in STAGES[: STAGES.index(args.until) + 1]}
        out[f"workers_{workers}"] = {
            "shards_dvc_md5": stages["stage"]["result"]["dvc_md5"],
            **{s: {k: v for k, v in r.items() if k != "result"} for s, r in stages.items()},
        }
        if "evaluate" in stages:
            m = stages["evaluate"]["result"]["metrics"]
            out[f"workers_{workers}"].update({
                "test_neg_elbo": m["neg_elbo"], "iw_nll": m.get("iw_nll"),
                "iw_nll_se": m.get("iw_nll_se"), "iw_examples": m.get("iw_examples"),
                "n_test": m["n_examples"], "likelihood": m["decoder"],
            })  # fmt: skip
    return out


def _ratios(res: dict, workers: list[int]) -> dict:
    out: dict = {}
    for name, d in res.items():
        if len(workers) >= 2:
            a, b = d[f"workers_{workers[0]}"], d[f"workers_{workers[1]}"]
            for s in ("stage", "train", "evaluate"):
                if s in a:
                    out[f"{name}_{s}_speedup"] = round(a[s]["seconds"] / b[s]["seconds"], 2)
            out[f"{name}_same_shards"] = a["shards_dvc_md5"] == b["shards_dvc_md5"]
            if "test_neg_elbo" in a:
                out[f"{name}_neg_elbo_diff_nats"] = round(
                    b["test_neg_elbo"] - a["test_neg_elbo"], 3
                )
        for w in workers if "register" in d[f"workers_{workers[0]}"] else []:
            r = d[f"workers_{w}"]
            spent = r["evaluate"]["seconds"] + r["register"]["seconds"]
            out[f"{name}_w{w}_eval_plus_register_over_train"] = round(
                spent / r["train"]["seconds"], 2
            )
    if {"fashion_mnist", "sprites"} <= res.keys():
        peak = {
            n: max(v["peak_rss_mb"] for k, d in res[n].items() if k.startswith("workers_")
                   for v in d.values() if isinstance(v, dict))
            for n in ("fashion_mnist", "sprites")
        }  # fmt: skip
        out["driver_peak_rss_sprites_over_fashion"] = round(
            peak["sprites"] / peak["fashion_mnist"], 2
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--sprites", type=int, default=200_000, help="sprites images")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="the Ray head's")
    parser.add_argument(
        "--until", choices=STAGES, default="register",
        help="the last stage to run (stage: staging alone, e.g. at --sprites 700000)",
    )  # fmt: skip
    args = parser.parse_args()

    port = _free_port()
    # A head of our own on 127.0.0.1 for this run: no token to hand to every stage.
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}", "PYTHONPATH": str(REPO),
           "RAY_AUTH_MODE": "disabled"}  # fmt: skip
    # --block and a session of its own: stopping it stops only this head (`ray stop` would
    # stop every Ray on the machine).
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         f"--num-cpus={args.cpus}", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    results = {}
    try:
        _wait_for(port)
        with tempfile.TemporaryDirectory(prefix="flow-at-scale-") as tmp:
            for name in args.datasets:
                results[name] = _dataset(name, args, Path(tmp), env)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
    print(
        json.dumps(
            {
                "benchmark": "flow_at_scale",
                "epochs": args.epochs,
                "cpus": args.cpus,
                "results": results,
                "ratios": _ratios(results, args.workers),
            },
            indent=1,
        )  # fmt: skip
    )


if __name__ == "__main__":
    main()
