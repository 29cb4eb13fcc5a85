"""A registered model is weights plus config; loading rebuilds the network from the config with
today's code. If the code changed what a config builds (a layer, an activation, a width), old
models would load without error and compute something else. These pin the function that a
config and a seed give, on fixed inputs, for each kind of network."""

from __future__ import annotations

import math

import pytest
import torch

from vae import ModelConfig, build_model

CASES = {
    "mlp": (
        ModelConfig(input_shape=(64,), latent_dim=4, hidden=(32, 16)),
        [0.13575, -1.04279, -1.41003],
        [0.55464, 1.04279, 12.10856],
    ),
    "conv": (
        ModelConfig(
            arch="conv", input_shape=(1, 8, 8), latent_dim=4, hidden=(32,), conv_channels=(8, 16)
        ),
        [-0.12982, 0.01101, 10.08139],
        [0.46012, 0.65771, 10.08139],
    ),
    # automatic depth for 16x16 RGB, no hidden sizes given (the Linear layer is 128 wide)
    "conv-automatic-rgb-bernoulli": (
        ModelConfig(
            arch="conv",
            input_shape=(3, 16, 16),
            latent_dim=4,
            hidden=(),
            conv_channels=(),
            likelihood="bernoulli",
        ),
        [-0.02545, 0.05732, -85.15467],
        [0.3495, 0.54556, 86.91114],
    ),
    "mlp-gelu-learned-variance": (
        ModelConfig(
            input_shape=(64,), latent_dim=4, hidden=(32,), variance="learned", activation="gelu"
        ),
        [-0.38035, -0.06834, -4.06205],
        [0.75436, 0.90697, 16.1012],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_config_and_seed_build_the_same_function_as_when_models_were_saved(name):
    cfg, sums, abs_sums = CASES[name]
    model = build_model(cfg, seed=0).eval()
    n = math.prod(cfg.input_shape)
    x = torch.linspace(0, 1, 2 * n).reshape(2, *cfg.input_shape)
    if cfg.likelihood == "bernoulli":
        x = (x > 0.5).float()
    with torch.no_grad():
        mu, logvar = model.encode(model.prepare_input(x))
        out = model.decode(mu)
    got = [float(t.double().sum()) for t in (mu, logvar, out)]
    got_abs = [float(t.double().abs().sum()) for t in (mu, logvar, out)]
    assert got == pytest.approx(sums, abs=2e-4)
    assert got_abs == pytest.approx(abs_sums, abs=2e-4)
