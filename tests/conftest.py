from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

# Ray Train's own telemetry (dashboard state reconciliation, Prometheus metrics, spot-preemption
# watcher, structured JSON logs) costs about 5 s of start-up per training run on 2 cores and is
# not what these tests check; the pipeline keeps Ray's defaults for users. Set before any Ray
# starts, so every cluster and CLI process the tests launch inherits it.
for _name in (
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION",
    "RAY_TRAIN_METRICS_ENABLED",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
    "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING",
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING",
):
    os.environ.setdefault(_name, "0")


@pytest.fixture(scope="session")
def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits scaled to [0, 1] as (N, 1, 8, 8), split 70/10/20 with a fixed permutation."""
    x = torch.tensor(load_digits().data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    n_train, n_val = int(0.7 * len(x)), int(0.1 * len(x))
    return (
        x[order[:n_train]],
        x[order[n_train : n_train + n_val]],
        x[order[n_train + n_val :]],
    )
