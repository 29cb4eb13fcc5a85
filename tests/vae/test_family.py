"""AE, DAE, VAE and beta-VAE share one interface; bad configs and bad data fail clearly."""

from __future__ import annotations

import itertools

import pytest
import torch

from vae import ConfigError, DataError, ModelConfig, NoiseConfig, build_model, evaluate


def _config(kind: str, likelihood: str, arch: str) -> ModelConfig:
    noise = NoiseConfig(gaussian_std=0.1, mask_prob=0.2) if kind == "dae" else NoiseConfig()
    beta = 4.0 if kind == "beta_vae" else 1.0
    return ModelConfig(
        kind=kind,
        arch=arch,
        likelihood=likelihood,
        input_shape=(1, 8, 8),
        latent_dim=3,
        hidden=(32,),
        conv_channels=(4, 8),
        beta=beta,
        mc_samples=2,
        noise=noise,
    )


@pytest.mark.parametrize(
    "kind,likelihood,arch",
    list(
        itertools.product(
            ["ae", "dae", "vae", "beta_vae"], ["gaussian", "bernoulli"], ["mlp", "conv"]
        )
    ),
)
def test_every_model_trains_one_step_and_reports_the_same_fields(kind, likelihood, arch):
    torch.manual_seed(0)
    model = build_model(_config(kind, likelihood, arch))
    x = (torch.rand(16, 1, 8, 8) > 0.5).float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = model(x)
    out.loss.backward()
    opt.step()
    assert out.recon_loss.shape == (16,) and out.kl.shape == (16,)
    assert out.recon_x.shape == x.shape
    assert torch.isfinite(out.loss)
    if kind in ("ae", "dae"):
        assert torch.equal(out.kl, torch.zeros(16))
    else:
        assert (out.kl > 0).all()
    res = evaluate(model, x, iw_k=5 if model.config.variational else 0)
    assert res.likelihood == likelihood and res.n_examples == 16


def test_ae_gaussian_loss_is_scaled_squared_error_plus_constant():
    import math

    model = build_model(ModelConfig(kind="ae", input_shape=(4,), latent_dim=2, sigma=0.5))
    x = torch.rand(3, 4)
    out = model(x)
    sq = ((x - out.recon_x) ** 2).sum(-1)
    const = 4 * math.log(0.5 * math.sqrt(2 * math.pi))
    torch.testing.assert_close(out.recon_loss, sq / (2 * 0.25) + const)


def test_beta_weights_the_kl_term_in_the_training_loss():
    torch.manual_seed(0)
    model = build_model(_config("beta_vae", "gaussian", "mlp"))
    x = torch.rand(8, 1, 8, 8)
    torch.manual_seed(1)
    out = model(x)
    torch.testing.assert_close(out.loss, (out.recon_loss + 4.0 * out.kl).mean())


def test_dae_corrupts_inputs_only_in_training_mode():
    model = build_model(_config("dae", "gaussian", "mlp"))
    x = torch.rand(4, 1, 8, 8)
    model.eval()
    a, b = model(x).recon_x, model(x).recon_x
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(x).recon_x, model(x).recon_x)


def test_learned_gaussian_variance_is_a_parameter_with_a_floor():
    cfg = ModelConfig(input_shape=(4,), latent_dim=2, variance="learned", sigma_min=0.05)
    model = build_model(cfg)
    assert any(n == "likelihood.log_sigma" for n, _ in model.named_parameters())
    with torch.no_grad():
        model.likelihood.log_sigma.fill_(-20.0)
    assert torch.isfinite(model(torch.rand(2, 4)).loss)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"latent_dim": 0}, "latent_dim must be a positive integer"),
        ({"kind": "beta_vae", "beta": -1.0}, "beta must be a non-negative number"),
        ({"likelihood": "poisson"}, "unknown likelihood 'poisson'"),
        ({"kind": "gan"}, "unknown kind 'gan'"),
        ({"latent_dim": 100, "input_shape": (64,)}, "larger than the input size"),
        ({"arch": "conv", "input_shape": (64,)}, "needs input_shape (C, H, W)"),
        ({"arch": "conv", "input_shape": (1, 6, 6)}, "divisible by 4"),
        ({"kind": "dae"}, "needs noise"),
        ({"kind": "vae", "beta": 2.0}, "use kind 'beta_vae'"),
        ({"mc_samples": 0}, "mc_samples must be at least 1"),
    ],
)
def test_bad_configs_raise_a_clear_error(overrides, message):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_data_shape_that_does_not_match_the_model_raises_a_clear_error():
    model = build_model(ModelConfig(input_shape=(1, 8, 8), latent_dim=2))
    with pytest.raises(
        DataError, match=r"example shape \(1, 7, 7\) but the model expects \(1, 8, 8\)"
    ):
        model(torch.rand(4, 1, 7, 7))


def test_nan_in_data_raises_a_clear_error():
    model = build_model(ModelConfig(input_shape=(4,), latent_dim=2))
    x = torch.rand(3, 4)
    x[1, 2] = float("nan")
    with pytest.raises(DataError, match="NaN or infinite"):
        model(x)


def test_config_round_trips_through_json():
    cfg = _config("dae", "bernoulli", "conv")
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_unknown_config_keys_are_refused():
    with pytest.raises(ConfigError, match="unknown keys"):
        ModelConfig.from_dict({"latent_dim": 2, "latnet": 3})
