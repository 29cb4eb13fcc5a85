"""Mutation testing of module-level constants and default values, which mutmut leaves alone
(it mutates code inside functions only). Each mutant below changes one science rule's value,
the fast vae and gate tests run against it (stopping at the first failure), and the mutant is
killed when they fail. Prints one JSON document: killed / total and the survivors.

    .venv/bin/python benchmarks/constant_mutants.py       # about 15 s per mutant on 2 cores

The source files are restored after each mutant, also on Ctrl-C.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
TESTS = ["tests/vae", "tests/registry/test_gate.py", "-m", "not slow"]

# (file, exact text, its mutant, the rule it breaks)
MUTANTS = [
    ("vae/evaluate.py", "ACTIVE_UNIT_THRESHOLD = 0.01", "ACTIVE_UNIT_THRESHOLD = 0.02",
     "active-unit threshold (Burda et al. 2016)"),
    ("vae/evaluate.py", "ACTIVE_UNIT_THRESHOLD = 0.01", "ACTIVE_UNIT_THRESHOLD = 0.005",
     "active-unit threshold, the other side"),
    ("vae/config.py", "    sigma_min: float = 1e-2", "    sigma_min: float = 1e-3",
     "learned-variance floor"),
    ("vae/config.py", "    sigma: float = 0.1", "    sigma: float = 0.2",
     "fixed decoder sigma's default"),
    ("vae/config.py", "    beta: float = 1.0", "    beta: float = 2.0", "the VAE's KL weight"),
    ("vae/config.py", "    mc_samples: int = 1", "    mc_samples: int = 2",
     "z samples per example by default"),
    ("vae/model.py", "kl_dims.mean(0).clamp(min=cfg.free_bits).sum()",
     "kl_dims.clamp(min=cfg.free_bits).sum(-1).mean()", "free bits on each example, not the batch mean"),
    ("vae/train.py", "        batches = shuffled_batches(train_x, cfg.batch_size, gen)",
     "        batches = iter_batches(train_x, cfg.batch_size)", "the training loop shuffles"),
    ("vae/train.py", "    seed_everything(cfg.seed)\n    if len(train_x) == 0",
     "    if len(train_x) == 0", "fit's seed drives its sampling noise"),
    ("vae/distributions.py", "LOG_2PI = math.log(2 * math.pi)", "LOG_2PI = math.log(math.pi)",
     "the Gaussian density's constant"),
    ("vae/conv_layout.py", "MAX_CONV_LAYERS = 6", "MAX_CONV_LAYERS = 5", "conv depth limit"),
    ("vae/keyed_noise.py", "_M32 = 0xFFFFFFFF", "_M32 = 0x7FFFFFFF", "keyed noise's 32-bit words"),
]  # fmt: skip


def _run_tests() -> bool:
    """True when the tests pass (the mutant survives)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    return proc.returncode == 0


def main() -> int:
    started = time.monotonic()
    if not _run_tests():
        print(json.dumps({"error": "the tests fail without any mutant; fix them first"}))
        return 1
    survivors, killed = [], 0
    for file, text, mutant, rule in tqdm(MUTANTS, desc="constant mutants", file=sys.stderr):
        path = REPO / file
        original = path.read_text()
        if original.count(text) != 1:
            survivors.append({"file": file, "rule": rule, "why": "text not found once: update"})
            continue
        try:
            path.write_text(original.replace(text, mutant))
            if _run_tests():
                survivors.append({"file": file, "rule": rule, "mutant": mutant})
            else:
                killed += 1
        finally:
            path.write_text(original)
    total = len(MUTANTS)
    print(json.dumps({
        "killed": killed, "total": total, "score": round(killed / total, 3),
        "survivors": survivors, "seconds": round(time.monotonic() - started),
    }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
