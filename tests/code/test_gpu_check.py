"""benchmarks/gpu_check.py on a machine without CUDA: one JSON line saying so, exit 0, no Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers.modules import load_module

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
NO_CUDA = {"cuda": False, "note": "no CUDA device: the GPU path is untested here"}


def test_gpu_check_without_cuda_prints_one_json_document_and_exits_0():
    # No visible device, so the no-CUDA path runs on GPU machines too.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == NO_CUDA


def test_gpu_check_without_cuda_starts_no_ray_and_stages_nothing(monkeypatch, capsys, tmp_path):
    gpu_check = load_module(
        "gpu_check", SCRIPT, fresh=True
    )  # runs nothing: main() is behind __main__
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    before = set(sys.modules)
    assert gpu_check.main([]) == 0
    assert json.loads(capsys.readouterr().out) == NO_CUDA
    assert not {m for m in set(sys.modules) - before if m.split(".")[0] in ("ray", "pipelines")}
    assert not list(tmp_path.iterdir())
