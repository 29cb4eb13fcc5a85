"""The model and training configs refuse exactly what they should, with the whole message,
and accept the edge itself: each case written out by hand (the specification)."""

from __future__ import annotations

import re

import pytest

from vae import ConfigError, ModelConfig, NoiseConfig, TrainConfig

BASE = {"input_shape": (6,), "latent_dim": 2, "hidden": (4,)}
CONV = {"arch": "conv", "input_shape": (1, 8, 8), "latent_dim": 2, "hidden": (4,)}

# (settings, the whole message after "model config: ", or None where the settings load)
MODEL_CASES = [
    ({"input_shape": ()}, "input_shape () must be non-empty with positive sizes"),
    ({"input_shape": (6, 0)}, "input_shape (6, 0) must be non-empty with positive sizes"),
    ({"input_shape": (1,), "latent_dim": 1}, None),
    ({"latent_dim": 6}, None),  # as wide as the input: still allowed
    (
        {"latent_dim": 7},
        "latent_dim 7 is larger than the input size 6; an autoencoder needs a "
        "bottleneck, lower latent_dim",
    ),  # fmt: skip
    ({"hidden": (4, 0)}, "hidden widths must be positive, got (4, 0)"),
    ({"hidden": (1,)}, None),
    ({"kind": "beta_vae", "beta": 0.0}, None),
    ({"kind": "beta_vae", "beta": -0.1}, "beta must be a non-negative number, got -0.1"),
    ({"sigma": 0.0}, "sigma (0.0) and sigma_min (0.01) must be positive"),
    ({"sigma_min": 0.0}, "sigma (0.1) and sigma_min (0.0) must be positive"),
    ({"sigma": 1e-9, "sigma_min": 1e-9}, None),
    (
        {"noise": NoiseConfig(mask_prob=1.0)},
        "noise.mask_prob must be in [0, 1) and noise.gaussian_std non-negative",
    ),  # fmt: skip
    (
        {"noise": NoiseConfig(gaussian_std=-0.1)},
        "noise.mask_prob must be in [0, 1) and noise.gaussian_std non-negative",
    ),  # fmt: skip
    ({"kind": "dae"}, "kind 'dae' needs noise.gaussian_std > 0 or noise.mask_prob > 0"),
    ({**CONV, "conv_channels": (8,) * 6, "input_shape": (1, 128, 128)}, None),
    (
        {**CONV, "conv_channels": (8,) * 7, "input_shape": (1, 256, 256)},
        "conv_channels must be 1 to 6 positive ints (one stride-2 layer each) or empty for "
        "automatic, got [8, 8, 8, 8, 8, 8, 8]",
    ),  # fmt: skip
    (
        {**CONV, "conv_channels": (8, 0)},
        "conv_channels must be 1 to 6 positive ints (one "
        "stride-2 layer each) or empty for automatic, got [8, 0]",
    ),  # fmt: skip
    ({**CONV, "conv_channels": (1,)}, None),
    (
        # An odd side: no conv layout can halve it, so the advice is to resize, never to
        # set conv_channels (which the other message would send back here: circular).
        {**CONV, "conv_channels": (), "input_shape": (1, 5, 5)},
        "arch 'conv' halves the image with each layer, and a 5x5 image has an odd side; resize "
        "the images to even sides (e.g. data.image_size for images and sprites) or use arch "
        "'mlp'",
    ),
    (
        {**CONV, "conv_channels": (8, 8), "input_shape": (1, 15, 15)},
        "arch 'conv' halves the image with each layer, and a 15x15 image has an odd side; "
        "resize the images to even sides (e.g. data.image_size for images and sprites) or use "
        "arch 'mlp'",
    ),
    (
        {**CONV, "conv_channels": (), "input_shape": (1, 2, 2)},
        "automatic conv_channels cannot halve a 2x2 image (it needs even sides over 4); give "
        "model.conv_channels explicitly, at most 1 layer(s) such as [32], or use 'mlp'",
    ),  # fmt: skip
    (
        {**CONV, "conv_channels": (8, 8, 8), "input_shape": (1, 12, 16)},
        "conv_channels [8, 8, 8] halve the image 3 times, so H and W must be divisible by 8, got "
        "12x16; use at most 2 conv_channels (or [] for automatic) or resize the images",
    ),  # fmt: skip
    ({**CONV, "conv_channels": (8, 8), "input_shape": (1, 12, 16)}, None),
    (
        {"likelihood": "poisson"},
        "unknown likelihood 'poisson'; choose one of gaussian, bernoulli",
    ),  # fmt: skip
    (
        {"free_bits": 0.5, "objective": "iwae", "mc_samples": 5},
        "free_bits applies to the ELBO's KL term: use objective 'elbo' with kind vae or "
        "beta_vae, or set free_bits to 0",
    ),  # fmt: skip
    ({"free_bits": 0.5}, None),
]


@pytest.mark.parametrize(("settings", "message"), MODEL_CASES)
def test_model_config_refuses_with_its_whole_message_or_loads(settings, message):
    if message is None:
        ModelConfig(**{**BASE, **settings})
        return
    with pytest.raises(ConfigError, match=f"^{re.escape('model config: ' + message)}$"):
        ModelConfig(**{**BASE, **settings})


TRAIN_CASES = [
    ({"epochs": 0}, "train config: epochs (0) and batch_size (128) must be positive"),
    ({"batch_size": 0}, "train config: epochs (30) and batch_size (0) must be positive"),
    ({"epochs": 1, "batch_size": 1}, None),
    ({"lr": 0.0}, "train config: lr must be positive and kl_warmup_epochs >= 0"),
    ({"kl_warmup_epochs": -1}, "train config: lr must be positive and kl_warmup_epochs >= 0"),
    ({"lr": 1e-9, "kl_warmup_epochs": 0}, None),
    ({"grad_clip_norm": 0.0}, "train config: grad_clip_norm must be positive or null"),
    ({"grad_clip_norm": None}, None),
    ({"grad_clip_norm": 1e-6}, None),
]


@pytest.mark.parametrize(("settings", "message"), TRAIN_CASES)
def test_train_config_refuses_with_its_whole_message_or_loads(settings, message):
    if message is None:
        TrainConfig(**settings)
        return
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        TrainConfig(**settings)
