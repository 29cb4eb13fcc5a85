"""The promotion gate streams the test split: at 10^6 test images, holding it (as register once
did, to score both models on it) is tens of GB."""

from __future__ import annotations

import weakref

import numpy as np
import torch

from pipelines.params import load_params
from pipelines.registry import gate, register
from vae import ModelConfig, build_model

BATCHES, SIZE = 40, 16


class _CountingLoader:
    """Stands in for the fixed-order test loader: every pass makes the same batches afresh and
    counts how many of them are alive at once."""

    def __init__(self) -> None:
        self.alive = self.peak = self.passes = 0

    def _gone(self) -> None:
        self.alive -= 1

    def __iter__(self):
        self.passes += 1
        for i in range(BATCHES):
            x = torch.rand(SIZE, 1, 4, 4, generator=torch.Generator().manual_seed(i))
            self.alive += 1
            self.peak = max(self.peak, self.alive)
            weakref.finalize(x, self._gone)
            yield {"x": x, "key": [f"k{i}-{j}" for j in range(SIZE)], "label": None}


def test_the_gate_scores_each_model_in_one_streamed_pass_holding_a_few_batches(monkeypatch):
    loader = _CountingLoader()
    monkeypatch.setattr("pipelines.data.loader.fixed_order_loader", lambda params, split: loader)
    params = load_params(None, ["register.mc_samples=2"])
    model = build_model(ModelConfig(input_shape=(1, 4, 4), latent_dim=2, hidden=(8,)), seed=0)

    test = register._score_test_split(params, model)
    assert test.scores.shape == (BATCHES * SIZE,) and loader.passes == 1
    first = torch.rand(SIZE, 1, 4, 4, generator=torch.Generator().manual_seed(0))[:8]
    assert torch.equal(test.example, first)  # the logged models' input example

    # A champion comparison reads the split once more, in the same order with the same random
    # numbers: the same model scores exactly the same there.
    again = gate.per_example_neg_elbo(model, test.loader, 2, params.registry.seed)
    assert np.array_equal(again, test.scores) and loader.passes == 2
    assert loader.peak <= 3, f"{loader.peak} of {BATCHES} batches held at once"
