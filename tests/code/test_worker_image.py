"""What a Ray worker runs imports with only the worker image's packages.

The worker image (infra/docker/Dockerfile, stage `worker`) installs requirements-worker.lock:
no Prefect, DVC, matplotlib or MLflow server. A subprocess of this venv makes every other
installed package missing (a None in sys.modules, what Python's import system reads as "not
installed"), imports the modules whose functions Ray ships to workers and everything those
modules import, also inside functions, and loads a pt2 model as the embed actors do."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys

from tests.helpers.params import REPO

# The modules whose tasks, actors and training loop run on Ray workers, and the model loading
# they call (the embed actors; the gate's scoring tasks).
WORKER_MODULES = [
    "pipelines.training.worker",
    "pipelines.jobs.embed",
    "pipelines.jobs.embed_sources",
    "pipelines.scoring.shard_scoring",
    "pipelines.scoring.held_out_pass",
    "pipelines.data.parallel_staging",
    "pipelines.data.staging",
    "pipelines.registry.models",
]

# Runs in the subprocess: argv[1] is the worker lock, argv[2] a saved model, the rest modules.
AS_ON_A_WORKER = r"""
import importlib, importlib.metadata, importlib.util, json, re, sys
from pathlib import Path

def norm(text):
    return re.sub(r"[-_.]+", "-", text).lower()

lock = {norm(ln.split("==")[0]) for ln in Path(sys.argv[1]).read_text().splitlines() if "==" in ln}
lock.add("vae-pipeline")
# Ray ships its own copies of a few packages (colorama, psutil) and puts them on sys.path.
ray_dir = Path(importlib.util.find_spec("ray").origin).parent / "thirdparty_files"
vendored = {p.name.removesuffix(".py") for p in ray_dir.iterdir()}
absent = sorted(
    top for top, dists in importlib.metadata.packages_distributions().items()
    if not any(norm(d) in lock for d in dists) and top not in vendored and top not in sys.modules
)
for top in absent:
    sys.modules[top] = None
for module in sys.argv[3:]:
    importlib.import_module(module)
import mlflow.pytorch, torch
model = mlflow.pytorch.load_model(sys.argv[2])
print(json.dumps({"absent": absent, "out": list(model(torch.ones(2, 4)).shape)}))
"""


def imports_of(module: str) -> set[str]:
    """Every absolute import in a module's file, inside functions too (Ray workers run those)."""
    tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out - {"__future__"}


def test_worker_modules_import_and_load_a_model_with_only_the_worker_images_packages(tmp_path):
    import mlflow.pytorch
    import torch

    model_dir = tmp_path / "model"
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
    example = torch.zeros(2, 4).numpy()
    mlflow.pytorch.save_model(model, model_dir, input_example=example, pip_requirements=["torch"])
    modules = sorted(set(WORKER_MODULES).union(*map(imports_of, WORKER_MODULES)))
    assert {"mlflow.pytorch", "ray.train.torch", "ray.data"} <= set(modules)
    lock = REPO / "requirements-worker.lock"
    proc = subprocess.run(
        [sys.executable, "-c", AS_ON_A_WORKER, str(lock), str(model_dir), "s3fs", *modules],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"dvc", "prefect", "matplotlib", "flask", "sqlalchemy", "alembic"} <= set(
        result["absent"]
    ), "the test must hide what the worker image lacks"
    assert result["out"] == [2, 3]


def test_the_worker_images_build_check_imports_the_worker_modules():
    dockerfile = (REPO / "infra" / "docker" / "Dockerfile").read_text()
    worker_stage = dockerfile.split("AS worker", 1)[1].split("AS pipeline", 1)[0]
    (check,) = re.findall(r'python -c "import ([^"]+)"', worker_stage)
    imported = {m.strip() for m in check.split(",")}
    assert {"pipelines.training.worker", "pipelines.jobs.embed", "mlflow.pytorch"} <= imported
    assert not {"prefect", "dvc", "pipelines.cli"} & imported
