"""Typed model configuration for the whole family: AE, DAE, VAE and beta-VAE.

A config round-trips through JSON so that it can be saved beside the weights and a model can be
rebuilt without pickle.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from vae.errors import ConfigError

Kind = Literal["ae", "dae", "vae", "beta_vae"]
Arch = Literal["mlp", "conv"]
Likelihood = Literal["gaussian", "bernoulli"]
Variance = Literal["fixed", "learned"]
Activation = Literal["relu", "gelu", "silu", "tanh", "elu"]

KINDS = ("ae", "dae", "vae", "beta_vae")
ARCHS = ("mlp", "conv")
LIKELIHOODS = ("gaussian", "bernoulli")
VARIANCES = ("fixed", "learned")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "elu")


@dataclass
class NoiseConfig:
    """Input corruption for denoising training (used only while the model is in train mode)."""

    gaussian_std: float = 0.0
    mask_prob: float = 0.0

    @property
    def active(self) -> bool:
        return self.gaussian_std > 0 or self.mask_prob > 0


@dataclass
class ModelConfig:
    kind: Kind = "vae"
    arch: Arch = "mlp"
    # Shape of one example: (D,) for vectors, (C, H, W) for images.
    input_shape: tuple[int, ...] = (64,)
    latent_dim: int = 8
    hidden: tuple[int, ...] = (256, 128)
    # Conv arch: channels of the two stride-2 conv layers.
    conv_channels: tuple[int, ...] = (32, 64)
    activation: Activation = "relu"
    likelihood: Likelihood = "gaussian"
    # Gaussian decoder: p(x|z) = N(f(z), sigma^2 I); sigma fixed, or learned per output dim.
    variance: Variance = "fixed"
    sigma: float = 0.1
    sigma_min: float = 1e-2
    # KL weight; 1 for a VAE, any positive value for a beta-VAE.
    beta: float = 1.0
    # Monte-Carlo samples L of z per example for the reconstruction term.
    mc_samples: int = 1
    noise: NoiseConfig = field(default_factory=NoiseConfig)

    def __post_init__(self) -> None:
        if isinstance(self.noise, dict):
            self.noise = NoiseConfig(**self.noise)
        self.input_shape = tuple(int(s) for s in self.input_shape)
        self.hidden = tuple(int(h) for h in self.hidden)
        self.conv_channels = tuple(int(c) for c in self.conv_channels)
        self.validate()

    @property
    def variational(self) -> bool:
        return self.kind in ("vae", "beta_vae")

    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)

    def validate(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"model config: {msg}")

        if self.kind not in KINDS:
            raise bad(f"unknown kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.arch not in ARCHS:
            raise bad(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.likelihood not in LIKELIHOODS:
            raise bad(
                f"unknown likelihood {self.likelihood!r}; choose one of {', '.join(LIKELIHOODS)}"
            )
        if self.variance not in VARIANCES:
            raise bad(f"unknown variance {self.variance!r}; choose one of {', '.join(VARIANCES)}")
        if self.activation not in ACTIVATIONS:
            raise bad(
                f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        if not self.input_shape or any(s <= 0 for s in self.input_shape):
            raise bad(f"input_shape {self.input_shape} must be non-empty with positive sizes")
        if self.latent_dim <= 0:
            raise bad(f"latent_dim must be a positive integer, got {self.latent_dim}")
        if self.latent_dim > self.input_dim:
            raise bad(
                f"latent_dim {self.latent_dim} is larger than the input size {self.input_dim}; "
                "an autoencoder needs a bottleneck, lower latent_dim"
            )
        if any(h <= 0 for h in self.hidden):
            raise bad(f"hidden widths must be positive, got {self.hidden}")
        if self.beta < 0 or not math.isfinite(self.beta):
            raise bad(f"beta must be a non-negative number, got {self.beta}")
        if self.kind == "vae" and self.beta != 1.0:
            raise bad(f"kind 'vae' has beta 1, got {self.beta}; use kind 'beta_vae' to weight KL")
        if self.sigma <= 0 or self.sigma_min <= 0:
            raise bad(f"sigma ({self.sigma}) and sigma_min ({self.sigma_min}) must be positive")
        if self.mc_samples < 1:
            raise bad(f"mc_samples must be at least 1, got {self.mc_samples}")
        if not 0 <= self.noise.mask_prob < 1 or self.noise.gaussian_std < 0:
            raise bad("noise.mask_prob must be in [0, 1) and noise.gaussian_std non-negative")
        if self.kind == "dae" and not self.noise.active:
            raise bad("kind 'dae' needs noise.gaussian_std > 0 or noise.mask_prob > 0")
        if self.arch == "conv":
            if len(self.input_shape) != 3:
                raise bad(f"arch 'conv' needs input_shape (C, H, W), got {self.input_shape}")
            _, h, w = self.input_shape
            if h % 4 or w % 4:
                raise bad(f"arch 'conv' needs H and W divisible by 4, got {h}x{w}")
            if len(self.conv_channels) != 2 or any(c <= 0 for c in self.conv_channels):
                raise bad(f"conv_channels must be two positive ints, got {self.conv_channels}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("input_shape", "hidden", "conv_channels"):
            d[k] = list(d[k])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"model config: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))
