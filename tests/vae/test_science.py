"""The model science: KL, reparameterisation, likelihood constants and the bounds on log p(x)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, MultivariateNormal, Normal
from torch.distributions import kl_divergence as torch_kl

from vae import (
    DataError,
    ModelConfig,
    build_model,
    evaluate,
    iw_log_likelihood,
    kl_divergence,
    reparameterize,
)


def test_closed_form_kl_equals_torch_distributions_kl():
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(64, 10, generator=gen) * 2
    logvar = torch.randn(64, 10, generator=gen) * 1.5
    ours = kl_divergence(mu, logvar).sum(-1)
    q = Normal(mu, torch.exp(0.5 * logvar))
    p = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    theirs = torch_kl(q, p).sum(-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_kl_is_zero_exactly_at_the_prior():
    zeros = torch.zeros(3, 4)
    assert torch.equal(kl_divergence(zeros, zeros), zeros)


def test_gradients_flow_through_reparameterised_sample_to_mean_and_logvar():
    mu = torch.randn(8, 3, requires_grad=True)
    logvar = torch.randn(8, 3, requires_grad=True)
    z = reparameterize(mu, logvar, n_samples=4)
    assert z.shape == (4, 8, 3)
    (z**2).sum().backward()
    assert mu.grad is not None and mu.grad.abs().sum() > 0
    assert logvar.grad is not None and logvar.grad.abs().sum() > 0


def test_reparameterised_samples_have_the_posterior_moments():
    torch.manual_seed(0)
    mu = torch.tensor([1.0, -2.0])
    logvar = torch.log(torch.tensor([0.25, 4.0]))
    z = reparameterize(mu, logvar, n_samples=200_000)
    torch.testing.assert_close(z.mean(0), mu, atol=0.02, rtol=0)
    torch.testing.assert_close(z.var(0), logvar.exp(), atol=0, rtol=0.02)


def test_gaussian_reconstruction_nll_includes_the_normalising_constant():
    cfg = ModelConfig(input_shape=(6,), latent_dim=2, sigma=0.3)
    lik = build_model(cfg).likelihood
    x, mean = torch.rand(5, 6), torch.rand(5, 6)
    expected = -Normal(mean, 0.3).log_prob(x).sum(-1)
    torch.testing.assert_close(lik.nll(x, mean), expected)


@pytest.mark.parametrize("learned", [False, True])
def test_gaussian_nll_when_scoring_is_bit_for_bit_the_training_formula(learned):
    """Scoring computes the Gaussian NLL in place (no autograd); it must not move a figure."""
    cfg = ModelConfig(
        input_shape=(6,), latent_dim=2, sigma=0.3, variance="learned" if learned else "fixed"
    )
    lik = build_model(cfg).likelihood
    with torch.no_grad():
        lik.log_sigma.add_(torch.randn(6) * 0.1)
    x, mean = torch.rand(5, 6), torch.rand(4, 5, 6)
    trained = lik.nll(x, mean.clone().requires_grad_())
    with torch.no_grad():
        scored = lik.nll(x, mean)
    assert torch.equal(scored, trained.detach())


def test_bernoulli_reconstruction_nll_is_cross_entropy_on_logits():
    cfg = ModelConfig(input_shape=(6,), latent_dim=2, likelihood="bernoulli")
    lik = build_model(cfg).likelihood
    x = (torch.rand(5, 6) > 0.5).float()
    logits = torch.randn(5, 6)
    expected = -Bernoulli(logits=logits).log_prob(x).sum(-1)
    torch.testing.assert_close(lik.nll(x, logits), expected)


def test_bernoulli_likelihood_refuses_grey_values():
    model = build_model(ModelConfig(input_shape=(4,), latent_dim=2, likelihood="bernoulli"))
    with pytest.raises(DataError, match="binary"):
        model(torch.full((2, 4), 0.5))


# -- probabilistic PCA: a model whose log p(x) is known exactly --------------------------------


def _ppca_model(sigma: float = 0.5):
    """A VAE whose decoder is the linear-Gaussian model x = W z + b + sigma * noise.

    The encoder gives the exact posterior mean and the marginal posterior variances, so the
    diagonal q is close to but not equal to the true (correlated) posterior: the ELBO is strictly
    below log p(x) and importance weighting closes the gap.
    """
    gen = torch.Generator().manual_seed(1)
    d, k = 5, 2
    W = torch.randn(d, k, generator=gen) + torch.tensor([[1.0, 1.0]])  # non-orthogonal columns
    b = torch.randn(d, generator=gen)
    cfg = ModelConfig(input_shape=(d,), latent_dim=k, hidden=(), sigma=sigma, sigma_min=1e-3)
    model = build_model(cfg)
    M = W.T @ W + sigma**2 * torch.eye(k)
    A = torch.linalg.solve(M, W.T)
    post_var = sigma**2 * torch.diag(torch.linalg.inv(M))
    with torch.no_grad():
        model.decoder.net[0].weight.copy_(W)
        model.decoder.net[0].bias.copy_(b)
        model.mu_head.weight.copy_(A)
        model.mu_head.bias.copy_(-A @ b)
        model.logvar_head.weight.zero_()
        model.logvar_head.bias.copy_(post_var.log())
    marginal = MultivariateNormal(b, W @ W.T + sigma**2 * torch.eye(d))
    x = marginal.sample((400,))
    exact_log_px = marginal.log_prob(x).mean().item()
    return model, x, exact_log_px


def test_elbo_below_iw_estimate_below_exact_log_likelihood_on_ppca():
    torch.manual_seed(0)
    model, x, exact = _ppca_model()
    res = evaluate(model, x, iw_k=1000, mc_samples=200)
    elbo, iw = -res.neg_elbo, -res.iw_nll
    assert elbo < iw - 0.01, "a diagonal posterior on correlated latents must leave a gap"
    # IW estimates are biased low; with k=1000 the Monte-Carlo error here is far below 0.01 nats.
    assert iw <= exact + 0.01
    assert exact - iw < 0.02


def test_iw_estimate_approaches_exact_log_likelihood_as_k_grows():
    torch.manual_seed(0)
    model, x, exact = _ppca_model()
    gaps = [exact - -evaluate(model, x, iw_k=k, seed=3).iw_nll for k in (1, 10, 100, 1000)]
    # The gap shrinks with k until it is lost in Monte-Carlo noise (~0.005 nats here).
    assert gaps[0] > gaps[1] > abs(gaps[2])
    assert gaps[0] > gaps[1] > abs(gaps[3])
    assert abs(gaps[3]) < 0.01


def test_iw_with_k_1000_is_batched_and_matches_small_batches():
    torch.manual_seed(0)
    model, x, _ = _ppca_model()
    big = evaluate(model, x, iw_k=1000, batch_size=400, seed=0).iw_nll
    small = evaluate(model, x, iw_k=1000, batch_size=7, seed=0).iw_nll
    assert math.isclose(big, small, rel_tol=0, abs_tol=0.01)


def test_evaluate_leaves_the_global_rng_untouched():
    model, x, _ = _ppca_model()
    torch.manual_seed(42)
    before = torch.random.get_rng_state()
    evaluate(model, x, iw_k=10)
    assert torch.equal(before, torch.random.get_rng_state())


def test_active_units_counts_latents_whose_posterior_mean_varies():
    model, x, _ = _ppca_model()
    with torch.no_grad():
        model.mu_head.weight[1].zero_()  # latent 1's mean no longer depends on x
    res = evaluate(model, x)
    assert res.active_units == 1
    assert len(res.kl_per_dim) == 2
    assert math.isclose(sum(res.kl_per_dim), res.kl, rel_tol=1e-6)


def test_evaluate_on_an_iterator_of_batches_equals_evaluate_on_a_tensor():
    model, x, _ = _ppca_model()
    batches = ({"x": x[i : i + 64], "key": None} for i in range(0, len(x), 64))
    a = evaluate(model, x, batch_size=64, iw_k=5).to_dict()
    b = evaluate(model, batches, iw_k=5).to_dict()
    assert a == b


def test_iw_log_likelihood_is_the_elbo_for_one_sample_and_never_below_the_mean_log_weight():
    torch.manual_seed(0)
    log_w = torch.randn(1, 5) * 3
    assert torch.equal(iw_log_likelihood(log_w), log_w[0])
    log_w = torch.randn(50, 5) * 3
    assert (iw_log_likelihood(log_w) >= log_w.mean(0)).all()
    # Equal weights: the estimate is that weight, whatever k.
    assert torch.allclose(iw_log_likelihood(torch.full((7, 3), -2.5)), torch.full((3,), -2.5))


def test_neg_elbo_is_the_loss_the_model_minimises_and_minus_the_elbo():
    """The loss rebuilt with torch.distributions from the posterior and the z the model drew:
    mean over examples of -E_q[log N(x; f(z), sigma^2 I)] + w KL(q(z|x) || N(0, I)), which for
    w = 1 is minus the ELBO."""
    cfg = ModelConfig(input_shape=(1, 8, 8), hidden=(16,), latent_dim=2, mc_samples=3)
    model = build_model(cfg, seed=0)
    x = torch.rand(6, 1, 8, 8)
    for weight in (0.3, 1.0):
        torch.manual_seed(1)
        out = model(x, kl_weight=weight)
        kl = torch_kl(Normal(out.mu, (0.5 * out.logvar).exp()), Normal(0.0, 1.0)).sum(-1)
        with torch.no_grad():
            means = model.likelihood.mean(model.decode(out.z)).reshape(3, 6, -1)  # (L, B, 64)
        log_px_z = Normal(means, cfg.sigma).log_prob(x.flatten(1)).sum(-1)  # (L, B)
        torch.testing.assert_close(out.loss, (-log_px_z.mean(0) + weight * kl).mean())


def test_the_elbo_is_the_expected_log_likelihood_minus_the_kl():
    from vae import elbo

    recon_nll, kl = torch.tensor([3.0, 0.5]), torch.tensor([1.0, 2.0])
    assert torch.equal(elbo(recon_nll, kl), torch.tensor([-4.0, -2.5]))


def test_evaluation_averages_reconstruction_and_kl_per_example_and_counts_active_units():
    from vae import DataError, ModelConfig, build_model, evaluate
    from vae.evaluate import ACTIVE_UNIT_THRESHOLD

    model = build_model(ModelConfig(input_shape=(6,), latent_dim=3, hidden=(8,)), seed=0)
    x = torch.rand(10, 6)
    res = evaluate(model, x, iw_k=0, mc_samples=1, seed=0)
    assert res.n_examples == 10 and res.iw_k is None and res.iw_nll is None
    assert res.neg_elbo == pytest.approx(res.per_example_neg_elbo.mean().item(), rel=1e-5)
    assert 0 < res.kl < res.neg_elbo and res.recon_nll == pytest.approx(
        res.neg_elbo - res.kl, rel=1e-5
    )
    with torch.no_grad():  # the posterior means' variance over the examples, per latent
        mu, _ = model.encode(model.prepare_input(x))
    var = mu.var(dim=0, unbiased=False)
    assert res.posterior_mean_variance == pytest.approx(var.tolist(), rel=1e-4, abs=1e-7)
    assert res.active_units == int((var > ACTIVE_UNIT_THRESHOLD).sum())
    single = evaluate(model, x[:1], iw_k=3, mc_samples=1, seed=0)
    assert single.n_examples == 1 and single.iw_k == 3 and single.iw_nll is not None
    with pytest.raises(
        DataError, match=r"^evaluation data is empty; check the held-out split or shards$"
    ):
        evaluate(model, x[:0], iw_k=0)


def test_reparameterised_samples_keep_the_posteriors_dtype_and_default_to_one_sample():
    """The noise itself is drawn in the posterior's dtype: float32 noise promoted to float64
    would carry float32's rounding into every sample."""
    mu = torch.zeros(5, 3, dtype=torch.float64)
    logvar = torch.zeros(5, 3, dtype=torch.float64)  # mu 0, sigma 1: z is the noise
    torch.manual_seed(3)
    z = reparameterize(mu, logvar)
    assert z.shape == (1, 5, 3) and z.dtype == torch.float64
    torch.manual_seed(3)
    assert torch.equal(z, torch.randn(1, 5, 3, dtype=torch.float64))


def test_evaluation_sums_the_posterior_over_batches_in_float64():
    """Per-dimension KL and the posterior means' variance are sums over every batch kept in
    float64 (float32 sums drift at millions of examples): equal to the same sums by hand."""
    from vae import ModelConfig, build_model, evaluate, kl_divergence

    model = build_model(ModelConfig(input_shape=(6,), latent_dim=3, hidden=(8,)), seed=0)
    x = torch.rand(10, 6) * 3
    res = evaluate(model, x, batch_size=4, seed=0)
    kl_dim = mu_sum = mu_sq = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for batch in (x[:4], x[4:8], x[8:]):
            mu, logvar = model.encode(model.prepare_input(batch))
            kl_dim = kl_dim + kl_divergence(mu, logvar).double().sum(0)
            mu_sum, mu_sq = mu_sum + mu.double().sum(0), mu_sq + mu.double().pow(2).sum(0)
    var = (mu_sq / 10 - (mu_sum / 10).pow(2)).clamp(min=0)
    assert res.kl_per_dim == pytest.approx((kl_dim / 10).tolist(), rel=1e-12, abs=0)
    assert res.posterior_mean_variance == pytest.approx(var.tolist(), rel=1e-12, abs=0)
