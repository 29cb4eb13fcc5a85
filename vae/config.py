"""Typed configuration: the model family (AE, DAE, VAE and beta-VAE) and its training.

No torch here: the pipeline validates params against these dataclasses in processes that
never train (staging, the command line). A model config round-trips through JSON so that it
can be saved beside the weights and a model can be rebuilt without pickle.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from vae.conv_layout import MAX_CONV_LAYERS, conv_channels_for
from vae.errors import ConfigError

Kind = Literal["ae", "dae", "vae", "beta_vae"]
Arch = Literal["mlp", "conv"]
Likelihood = Literal["gaussian", "bernoulli"]
Variance = Literal["fixed", "learned"]
Activation = Literal["relu", "gelu", "silu", "tanh", "elu"]
Objective = Literal["elbo", "iwae"]

KINDS = ("ae", "dae", "vae", "beta_vae")
ARCHS = ("mlp", "conv")
LIKELIHOODS = ("gaussian", "bernoulli")
VARIANCES = ("fixed", "learned")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "elu")
OBJECTIVES = ("elbo", "iwae")


@dataclass
class NoiseConfig:
    """Input corruption for denoising training (used only while the model is in train mode)."""

    gaussian_std: float = 0.0
    mask_prob: float = 0.0

    @property
    def active(self) -> bool:
        return self.gaussian_std > 0 or self.mask_prob > 0


def _halvings(h: int, w: int) -> int:
    """How many times both sides halve evenly (stride-2 conv layers the image allows)."""
    k = 0
    while h % 2 ** (k + 1) == 0 and w % 2 ** (k + 1) == 0 and k < MAX_CONV_LAYERS:
        k += 1
    return k


@dataclass
class ModelConfig:
    kind: Kind = "vae"
    arch: Arch = "mlp"
    # Shape of one example: (D,) for vectors, (C, H, W) for images.
    input_shape: tuple[int, ...] = (64,)
    latent_dim: int = 8
    hidden: tuple[int, ...] = (256, 128)
    # Conv arch: one stride-2 conv layer per entry (1 to 6), so H and W must divide by
    # 2**len; empty = automatic from the image size (vae.conv_layout.default_conv_channels:
    # a 4x4 grid where the size allows). Stays (32, 64) so configs that omit it keep their net.
    conv_channels: tuple[int, ...] = (32, 64)
    activation: Activation = "relu"
    likelihood: Likelihood = "gaussian"
    # Gaussian decoder: p(x|z) = N(f(z), sigma^2 I); sigma fixed, or learned per output dim.
    variance: Variance = "fixed"
    sigma: float = 0.1
    sigma_min: float = 1e-2
    # KL weight; 1 for a VAE, any positive value for a beta-VAE.
    beta: float = 1.0
    # Samples of z per example: the ELBO averages its reconstruction term over them (L); the
    # IWAE objective log-mean-exps their importance weights (k).
    mc_samples: int = 1
    # Training objective: "elbo", or "iwae", the k-sample importance-weighted bound (Burda et
    # al. 2016; k = mc_samples), tighter than the ELBO for k > 1 and equal to it for k = 1.
    objective: Objective = "elbo"
    # Free bits (nats per latent dimension; Kingma et al. 2016): in the training loss each
    # dimension's batch-mean KL counts as at least this much, so pushing a dimension's KL
    # below it gains nothing and fewer units collapse. 0 = off; reported figures never use it.
    free_bits: float = 0.0
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

        self._validate_choices(bad)
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
        self._validate_objective(bad)
        if not 0 <= self.noise.mask_prob < 1 or self.noise.gaussian_std < 0:
            raise bad("noise.mask_prob must be in [0, 1) and noise.gaussian_std non-negative")
        if self.kind == "dae" and not self.noise.active:
            raise bad("kind 'dae' needs noise.gaussian_std > 0 or noise.mask_prob > 0")
        if self.arch == "conv":
            self._validate_conv(bad)

    def _validate_conv(self, bad) -> None:
        """The conv net's stride-2 layers must halve the image evenly, each of them."""
        if len(self.input_shape) != 3:
            raise bad(f"arch 'conv' needs input_shape (C, H, W), got {self.input_shape}")
        _, h, w = self.input_shape
        if len(self.conv_channels) > MAX_CONV_LAYERS or any(c <= 0 for c in self.conv_channels):
            raise bad(
                f"conv_channels must be 1 to {MAX_CONV_LAYERS} positive ints (one stride-2 "
                f"layer each) or empty for automatic, got {list(self.conv_channels)}"
            )
        if h % 2 or w % 2:  # no stride-2 layer halves an odd side: only resizing helps
            raise bad(
                f"arch 'conv' halves the image with each layer, and a {h}x{w} image has an "
                "odd side; resize the images to even sides (e.g. data.image_size for "
                "images and sprites) or use arch 'mlp'"
            )
        channels = conv_channels_for(self.conv_channels, self.input_shape)
        halvings = _halvings(h, w)
        if not channels:
            raise bad(
                f"automatic conv_channels cannot halve a {h}x{w} image (it needs even sides "
                f"over 4); give model.conv_channels explicitly, at most {halvings} layer(s) "
                f"such as {[32, 64][:halvings] or [32]}, or use 'mlp'"
            )
        if len(channels) > halvings:
            auto = conv_channels_for((), self.input_shape)
            raise bad(
                f"conv_channels {list(channels)} halve the image {len(channels)} times, so H "
                f"and W must be divisible by {2 ** len(channels)}, got {h}x{w}; use at most "
                f"{halvings} conv_channels"
                + (" (or [] for automatic)" if auto else "")
                + " or resize the images"
            )

    def _validate_choices(self, bad) -> None:
        choices = {
            "kind": KINDS, "arch": ARCHS, "likelihood": LIKELIHOODS, "variance": VARIANCES,
            "activation": ACTIVATIONS, "objective": OBJECTIVES,
        }  # fmt: skip
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise bad(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")

    def _validate_objective(self, bad) -> None:
        if self.objective == "iwae" and not self.variational:
            raise bad(f"objective 'iwae' needs a variational kind (vae, beta_vae), not {self.kind}")
        if not (self.free_bits >= 0 and math.isfinite(self.free_bits)):
            raise bad(f"free_bits must be a non-negative number of nats, got {self.free_bits}")
        if self.free_bits > 0 and (not self.variational or self.objective != "elbo"):
            raise bad("free_bits applies to the ELBO's KL term: use objective 'elbo' with kind "
                      "vae or beta_vae, or set free_bits to 0")  # fmt: skip

    @property
    def objective_name(self) -> str:
        """How a model was trained, as reported beside its figures."""
        if self.objective == "iwae":
            return f"iwae (k={self.mc_samples})"
        return "elbo" + (f" (free bits {self.free_bits:g})" if self.free_bits > 0 else "")

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


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    # KL weight rises linearly from 0 to beta over this many epochs (0: no warm-up).
    kl_warmup_epochs: int = 0
    # None: no clipping. A norm of 10 cost about 1 nat of test NLL on binarised 28x28 images
    # (MLP, 10 epochs); the non-finite-loss check stops a diverging run instead.
    grad_clip_norm: float | None = None
    # Stop after this many epochs without a better validation -ELBO (None: never).
    early_stopping_patience: int | None = 10
    min_delta: float = 0.0
    seed: int = 0
    # Each batch is computed in this many equal parts, a backward pass each, their gradients
    # added before the step: the arithmetic of that many data-parallel ranks, on however many
    # there are. None: the caller decides (fit: one part; the pipeline: one per worker).
    batch_parts: int | None = None

    def __post_init__(self) -> None:
        if self.batch_parts is not None and self.batch_parts < 1:
            raise ConfigError(f"train config: batch_parts ({self.batch_parts}) must be positive")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(
                f"train config: epochs ({self.epochs}) and batch_size ({self.batch_size}) "
                "must be positive"
            )
        if self.lr <= 0 or self.kl_warmup_epochs < 0:
            raise ConfigError("train config: lr must be positive and kl_warmup_epochs >= 0")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ConfigError("train config: grad_clip_norm must be positive or null")
