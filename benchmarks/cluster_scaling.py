"""Scaling across hosts: samples/s of 1 Ray Train worker on 1 host against 2 workers on 2
hosts, each host pinned to a core of its own, on the multi-host stack (infra/testing/multihost_cluster.py:
network namespaces, shards and checkpoints in an S3 server, MLflow on its own host). Goal: 2
hosts give at least 1.7x one host. Prints one JSON line. Needs root (network namespaces) and
at least 2 cores.

Run on demand: `.venv/bin/python benchmarks/cluster_scaling.py [--samples 6000 --epochs 4]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _cli(cluster, command: str, sets: list[str]) -> dict:
    net = cluster.net
    (net.home("client") / "params.yaml").write_text((REPO / "params.yaml").read_text())
    argv = [str(BIN / "vae-pipeline"), command, "--params", "params.yaml", "--quiet", "--json"]
    argv += [x for s in sets for x in ("--set", s)]
    out = net.run("client", argv, cluster.client_env, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{command} failed: {out.stderr[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rate(result: dict) -> float:
    history = json.loads((Path(result["model_dir"]).parent / "history.json").read_text())
    return statistics.median(h["train_samples_per_s"] for h in history[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "infra" / "testing"))  # test infrastructure: files, no package
    import multihost_cluster

    with (
        tempfile.TemporaryDirectory() as tmp,
        multihost_cluster.start_cluster(Path(tmp), pin_cpus=True) as cluster,
    ):
        shards = f"s3://{cluster.bucket}/sprites"
        data = [f"data.shards_dir={shards}", "data.source=sprites", f"data.size={args.samples}"]
        _cli(cluster, "stage", data)
        common = [
            *data, f"cluster.storage_path=s3://{cluster.bucket}/bench", "mlflow.tracking_uri=null",
            "model.arch=conv", "model.hidden=[256]", "model.latent_dim=10",
            f"train.epochs={args.epochs}", "train.batch_size=128",
            "train.early_stopping_patience=null", "cluster.cpus_per_worker=1",
        ]  # fmt: skip
        one = _cli(cluster, "train", [*common, "cluster.num_workers=1", "cluster.run_name=one"])
        a = _rate(one)  # before the next run replaces outputs/train
        two = _cli(cluster, "train", [*common, "cluster.num_workers=2", "cluster.run_name=two"])
        b = _rate(two)
    print(json.dumps({
        "benchmark": "cluster_scaling", "model": "vae conv, 64x64 sprites",
        "samples": args.samples, "hosts_pinned_to_one_core_each": True,
        "samples_per_s_1_worker_1_host": round(a, 1),
        "samples_per_s_2_workers_2_hosts": round(b, 1),
        "scaling": round(b / a, 3), "worker_nodes_2": sorted(set(two["worker_nodes"])),
        "goal": 1.7,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
