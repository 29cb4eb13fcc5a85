"""The `vae` package loads its names on first use: every public name still resolves, and the
processes that never touch a model (staging, the command line) do not pay torch's import."""

import importlib
import subprocess
import sys
from pathlib import Path

import vae

ROOT = Path(__file__).resolve().parents[2]


def test_every_public_name_resolves_to_the_object_its_module_defines():
    assert set(vae.__all__) == set(vae._WHERE)
    for name in vae.__all__:
        module = importlib.import_module(f"vae.{vae._WHERE[name]}")
        assert getattr(vae, name) is getattr(module, name), name
    assert set(vae.__all__) <= set(dir(vae))


def test_train_config_is_the_same_class_from_the_library_and_its_training_module():
    from vae.config import TrainConfig
    from vae.train import TrainConfig as FromTrain

    assert vae.TrainConfig is TrainConfig is FromTrain


def test_the_command_line_and_staging_import_without_torch():
    code = (
        "import sys, pipelines.cli, pipelines.data.staging, pipelines.data.parallel_staging; "
        "print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
