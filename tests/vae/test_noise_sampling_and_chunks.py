"""The DAE's perturbation, the decoders' sampling and the importance-weight chunking do what
their docstrings say, measured on enough draws to tell a wrong scale or rate apart."""

from __future__ import annotations

import pytest
import torch

from vae import DataError, ModelConfig, NoiseConfig, StorageError, build_model

N = 20_000


def dae(std: float = 0.0, mask: float = 0.0):
    kind = "dae" if std or mask else "vae"  # a DAE without noise is refused by its config
    noise = NoiseConfig(gaussian_std=std, mask_prob=mask)
    return build_model(
        ModelConfig(kind=kind, input_shape=(N,), latent_dim=2, hidden=(4,), noise=noise)
    )


def test_dae_gaussian_noise_has_the_configured_spread_and_no_bias():
    torch.manual_seed(0)
    x = torch.full((1, N), 0.5)
    noise = dae(std=0.3).corrupt(x) - x
    assert noise.std().item() == pytest.approx(0.3, rel=0.05)
    assert abs(noise.mean().item()) < 0.02


def test_dae_masking_zeroes_the_configured_fraction_and_keeps_the_rest_unchanged():
    torch.manual_seed(0)
    x = torch.full((1, N), 0.5)
    y = dae(mask=0.25).corrupt(x)
    assert (y == 0).float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert torch.all((y == 0) | (y == 0.5))


def test_dae_without_noise_passes_the_input_through_unchanged():
    x = torch.rand(1, N)
    assert torch.equal(dae().corrupt(x), x)


def test_gaussian_decoder_samples_spread_by_its_sigma_around_the_mean():
    torch.manual_seed(0)
    model = build_model(ModelConfig(input_shape=(N,), latent_dim=2, hidden=(4,), sigma=0.2))
    out = torch.full((1, N), 0.3)
    draws = model.likelihood.sample(out)
    assert (draws - out).std().item() == pytest.approx(0.2, rel=0.05)
    assert (draws - out).mean().abs().item() < 0.01


def test_bernoulli_decoder_samples_are_binary_with_the_sigmoid_of_the_logit_as_rate():
    torch.manual_seed(0)
    cfg = ModelConfig(input_shape=(N,), latent_dim=2, hidden=(4,), likelihood="bernoulli")
    logits = torch.full((1, N), torch.logit(torch.tensor(0.8)).item())
    draws = build_model(cfg).likelihood.sample(logits)
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    assert draws.mean().item() == pytest.approx(0.8, abs=0.01)


def test_bernoulli_likelihood_refuses_grey_values_saying_how_to_fix_it():
    cfg = ModelConfig(input_shape=(4,), latent_dim=2, hidden=(4,), likelihood="bernoulli")
    with pytest.raises(DataError, match=r"^bernoulli likelihood needs binary data \(0/1\)") as e:
        build_model(cfg).prepare_input(torch.tensor([[0.0, 0.5, 1.0, 1.0]]))
    assert str(e.value).endswith(
        "binarize the data (data.binarize: true) or use likelihood 'gaussian'"
    )


@pytest.mark.parametrize(("k", "chunk", "decodes"), [(7, 3, 3), (3, 1, 3), (5, None, 1)])
def test_importance_weights_decode_chunk_size_samples_at_a_time(k, chunk, decodes, monkeypatch):
    model = build_model(ModelConfig(input_shape=(6,), latent_dim=2, hidden=(4,)), seed=0)
    calls = []
    decode = model.decode
    monkeypatch.setattr(model, "decode", lambda z: calls.append(len(z)) or decode(z))
    w = model.log_importance_weights(torch.rand(2, 6), k, chunk_size=chunk)
    assert w.shape == (k, 2)
    assert len(calls) == decodes
    assert sum(calls) == k  # every one of the k samples decoded exactly once


def test_importance_weights_of_a_plain_autoencoder_are_refused_naming_the_model_kinds():
    model = build_model(ModelConfig(kind="ae", input_shape=(6,), latent_dim=2, hidden=(4,)))
    with pytest.raises(DataError, match=r"^importance weights need a variational model \(kind"):
        model.log_importance_weights(torch.rand(2, 6), 3)


def test_a_storage_error_reads_as_its_message_without_the_errno_prefix():
    assert str(StorageError(28, "no space left on device while writing x")) == (
        "no space left on device while writing x"
    )
    assert str(StorageError("plain message")) == "plain message"


def test_each_likelihood_names_itself_and_its_variance_for_the_reports():
    def describe(**kw) -> str:
        cfg = ModelConfig(input_shape=(4,), latent_dim=2, hidden=(4,), **kw)
        return build_model(cfg).likelihood.describe()

    assert describe(likelihood="bernoulli") == "bernoulli"
    assert describe(sigma=0.25) == "gaussian (fixed sigma 0.25)"
    assert describe(variance="learned", sigma=0.5, sigma_min=0.01) == (
        "gaussian (learned sigma per dimension: mean 0.5, floor 0.01)"
    )


def test_a_training_state_restored_without_a_beta_weighs_the_kl_fully():
    from vae import TrainConfig
    from vae.train import TrainingState

    cfg = TrainConfig(epochs=4, kl_warmup_epochs=0)
    state = TrainingState(cfg)
    state.update(10.0)
    restored = TrainingState.from_dict(state.to_dict(), cfg)
    assert restored.beta == 1.0 and restored.kl_weight(restored.epoch) == 1.0
    assert (restored.epoch, restored.best_epoch, restored.best_val_neg_elbo) == (1, 0, 10.0)
