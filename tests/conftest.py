from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits


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
