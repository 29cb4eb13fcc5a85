"""Evaluation's one pass over the test split: the same figures as from a list of the batches,
what MIG and the figures need noted on the way, and no batch held once it has gone by."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import numpy as np
import pytest
import torch

from pipelines.scoring import held_out_pass
from pipelines.scoring.held_out_pass import HeldOutPass
from vae import ModelConfig, build_model, evaluate


@pytest.fixture
def model():
    return build_model(ModelConfig(input_shape=(1, 8, 8), latent_dim=3, hidden=(16,)), seed=0)


def _batches(n_batches: int, size: int = 16):
    gen = torch.Generator().manual_seed(0)
    for i in range(n_batches):
        yield {
            "x": torch.rand(size, 1, 8, 8, generator=gen),
            "label": torch.arange(size) % 10,
            "key": [f"s{i}-{j}" for j in range(size)],
        }


def test_evaluating_through_the_pass_gives_the_figures_of_the_listed_batches(model):
    listed = evaluate(model, list(_batches(5)), iw_k=3, seed=0)
    passed = evaluate(model, HeldOutPass(model, _batches(5), all_means=True), iw_k=3, seed=0)
    a, b = dataclasses.asdict(listed), dataclasses.asdict(passed)
    assert torch.equal(a.pop("per_example_neg_elbo"), b.pop("per_example_neg_elbo"))
    assert a == b


def test_the_pass_notes_first_examples_keys_labels_and_posterior_means_in_order(model):
    held_out = HeldOutPass(model, _batches(3), all_means=True)
    seen = list(held_out)
    x = torch.cat([b["x"] for b in seen])
    assert torch.equal(held_out.first, x[:8])
    assert held_out.first.untyped_storage().nbytes() == 8 * 64 * 4, "a copy, not a view"
    assert held_out.keys == [k for b in seen for k in b["key"]]
    mu = model.eval().embed(x)[0].detach().double().numpy()
    np.testing.assert_allclose(held_out.all_posterior_means(), mu, rtol=1e-6, atol=1e-6)
    points, labels = held_out.latent()
    assert len(points) == 48 and labels.tolist() == [j % 10 for _ in range(3) for j in range(16)]


def test_past_the_latent_cap_means_are_noted_only_when_mig_needs_them(model, monkeypatch):
    monkeypatch.setattr(held_out_pass, "MAX_LATENT_POINTS", 20)
    for all_means, noted in ((False, 32), (True, 80)):
        held_out = HeldOutPass(model, _batches(5), all_means=all_means)
        list(held_out)
        assert len(held_out.all_posterior_means()) == noted == len(held_out.keys)
        points, labels = held_out.latent()
        assert len(points) == len(labels) == 32, "whole batches until the cap is passed"
        assert held_out.examples == 80


def test_no_batch_is_kept_once_it_has_gone_by(model):
    """A list of the test batches was tens of GB at 10^6 images; the pass keeps 8 examples."""
    refs = []

    def tracked():
        for batch in _batches(4):
            refs.append(weakref.ref(batch["x"]))
            yield batch

    evaluate(model, HeldOutPass(model, tracked(), all_means=True), seed=0)
    gc.collect()
    assert len(refs) == 4 and all(r() is None for r in refs)
