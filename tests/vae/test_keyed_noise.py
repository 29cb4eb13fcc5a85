"""Per-example noise: an example's z samples depend on its seed only, never on batching, order,
chunking or which worker scores it; the sums of parts merge into the sums of the whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from vae import Batch, EvalSums, ModelConfig, build_model, evaluate, keyed_normal, score_batches


def _seeds(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64) * 1_000_003 + 987_654_321_012


def test_keyed_draws_are_standard_normal_and_uncorrelated():
    z = keyed_normal(_seeds(500), 200, 8)
    assert z.shape == (200, 500, 8) and z.dtype == torch.float32
    flat = z.flatten().double()
    assert abs(flat.mean().item()) < 0.01 and abs(flat.var().item() - 1) < 0.01
    assert stats.kstest(flat[:100_000].numpy(), "norm").pvalue > 1e-3
    for a, b in ((z[:-1], z[1:]), (z[:, :-1], z[:, 1:]), (z[..., :-1], z[..., 1:])):
        r = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
        assert abs(r) < 0.01  # neighbouring samples, examples and dimensions


def test_a_chunk_of_samples_is_a_slice_of_the_whole_and_a_subset_of_examples_too():
    s = _seeds(10)
    whole = keyed_normal(s, 50, 4)
    assert torch.equal(keyed_normal(s[3:6], 7, 4, start=20), whole[20:27, 3:6])
    assert not torch.equal(keyed_normal(s + 1, 50, 4), whole)  # another seed, other draws


def _model(**kw):
    cfg = ModelConfig(input_shape=(6,), latent_dim=3, hidden=(8,), **kw)
    return build_model(cfg, seed=0)


def test_an_examples_scores_do_not_depend_on_its_batch_or_position():
    model, x, s = _model(), torch.rand(12, 6), _seeds(12)
    whole = score_batches(model, [Batch(x, s)], mc_samples=3).per_example_neg_elbo()
    parts = [Batch(x[i : i + 5], s[i : i + 5]) for i in range(0, 12, 5)]
    split = score_batches(model, parts, mc_samples=3).per_example_neg_elbo()
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    shuffled = score_batches(model, [Batch(x[perm], s[perm])], mc_samples=3)
    assert torch.allclose(whole, split, rtol=1e-6, atol=1e-6)
    assert torch.allclose(shuffled.per_example_neg_elbo(), whole[perm], rtol=1e-6, atol=1e-6)
    # The global seed no longer matters once examples carry their own.
    again = score_batches(model, [Batch(x, s)], mc_samples=3, seed=99).per_example_neg_elbo()
    assert torch.equal(again, whole)


def test_changing_one_examples_seed_changes_only_that_example():
    model, x, s = _model(), torch.rand(6, 6), _seeds(6)
    a = score_batches(model, [Batch(x, s)], mc_samples=2).per_example_neg_elbo()
    s2 = s.clone()
    s2[2] += 1
    b = score_batches(model, [Batch(x, s2)], mc_samples=2).per_example_neg_elbo()
    changed = (a != b).nonzero().flatten().tolist()
    assert changed == [2]


def test_keyed_importance_weights_do_not_depend_on_the_chunk_size():
    model, x, s = _model(), torch.rand(4, 6), _seeds(4)
    whole = model.log_importance_weights(x, 30, noise_seeds=s)
    for chunk in (1, 7, 30):
        w = model.log_importance_weights(x, 30, chunk_size=chunk, noise_seeds=s)
        assert torch.allclose(w, whole, rtol=1e-6, atol=1e-6)
    # The i-th IW sample is the i-th ELBO sample: one stream per example.
    out = model(x, kl_weight=1.0, n_samples=30, noise_seeds=s)
    mu, logvar = model.encode(model.prepare_input(x))
    assert torch.allclose(out.z, mu + torch.exp(0.5 * logvar) * keyed_normal(s, 30, 3), atol=1e-6)


def test_iw_covers_only_flagged_examples_and_reports_their_standard_error():
    model, x, s = _model(), torch.rand(20, 6), _seeds(20)
    flag = torch.zeros(20, dtype=torch.bool)
    flag[::3] = True
    res = evaluate(model, [Batch(x, s, flag)], iw_k=16)
    assert res.iw_examples == 7 and res.n_examples == 20 and res.iw_k == 16
    each = -torch.logsumexp(model.log_importance_weights(x[flag], 16, noise_seeds=s[flag]), 0)
    each = each.double() + np.log(16)
    assert res.iw_nll == pytest.approx(each.mean().item(), rel=1e-6)
    assert res.iw_nll_se == pytest.approx(each.std().item() / np.sqrt(7), rel=1e-6)
    everyone = evaluate(model, [Batch(x, s)], iw_k=16)
    assert everyone.iw_examples == 20


def test_sums_of_parts_merge_into_the_sums_of_the_whole():
    model, x, s = _model(), torch.rand(30, 6), _seeds(30)
    flag = torch.arange(30) % 2 == 0
    whole = score_batches(model, [Batch(x, s, flag)], iw_k=8)
    merged = EvalSums(3)
    for i in (0, 10, 20):
        part = score_batches(model, [Batch(x[i : i + 10], s[i : i + 10], flag[i : i + 10])], iw_k=8)
        merged.merge(part)
    a, b = whole.result(model.config, 8), merged.result(model.config, 8)
    for name in ("neg_elbo", "recon_nll", "kl", "iw_nll", "iw_nll_se"):
        assert getattr(b, name) == pytest.approx(getattr(a, name), rel=1e-6), name
    assert b.kl_per_dim == pytest.approx(a.kl_per_dim, rel=1e-6)
    assert b.posterior_mean_variance == pytest.approx(a.posterior_mean_variance, rel=1e-6)
    assert (b.n_examples, b.iw_examples) == (30, 15)


@pytest.mark.parametrize(
    ("n", "dim", "start"), [(1, 8, 0), (7, 3, 5), (300, 16, 0), (1, 784, 2**24)]
)
def test_the_numpy_hash_on_cpu_gives_the_torch_hashs_uniforms_to_the_bit(n, dim, start):
    """keyed_normal hashes in numpy on CPU (faster) and in torch elsewhere (GPUs): the same
    integers, so the same draws wherever an example is scored."""
    from vae.keyed_noise import _uniforms_numpy, _uniforms_torch

    seeds = torch.cat(
        [torch.randint(0, 2**62, (50,), generator=torch.Generator().manual_seed(n)),
         torch.tensor([0, 1, 2**32 - 1, 2**32, 2**63 - 1, -1, -(2**63)])]
    )  # fmt: skip
    for a, b in zip(
        _uniforms_numpy(seeds, n, dim, start), _uniforms_torch(seeds, n, dim, start), strict=True
    ):
        assert a.dtype == b.dtype == torch.float64 and a.shape == b.shape == (n, len(seeds), dim)
        assert torch.equal(a, b)
