"""Decoder likelihoods p(x|z). Each returns the per-example negative log-likelihood in nats.

Gaussian: -log N(x; f(z), sigma^2 I) = 1/2 * sum_i (x_i - f_i)^2 / sigma_i^2 + C,
with C = sum_i log(sigma_i * sqrt(2 pi)); C is always included so figures are true nats.
Bernoulli: cross-entropy of x against the decoder's logits; needs x in {0, 1}.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vae.config import ModelConfig
from vae.distributions import LOG_2PI
from vae.errors import DataError


class GaussianLikelihood(nn.Module):
    name = "gaussian"

    def __init__(self, input_dim: int, sigma: float, learned: bool, sigma_min: float) -> None:
        super().__init__()
        self.sigma_min = sigma_min
        self.learned = learned
        log_sigma = torch.full((input_dim,), math.log(sigma))
        if learned:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)

    def _log_sigma(self) -> Tensor:
        # A floor on sigma: pixels that are constant in the data would otherwise drive sigma to 0
        # and the density to infinity.
        return self.log_sigma.clamp(min=math.log(self.sigma_min))

    def nll(self, x: Tensor, out: Tensor) -> Tensor:
        """x: (B, D); out: (..., B, D) decoder means; returns (..., B)."""
        log_sigma = self._log_sigma()
        w = torch.exp(-2 * log_sigma)
        if torch.is_grad_enabled() and (out.requires_grad or w.requires_grad):
            sq = (x - out).pow(2) * w
        else:
            # Scoring (IW at k=1000 is mostly this): the same arithmetic in place, bit for bit,
            # in one buffer instead of three (1.8x faster on a (100, 64, 4096) batch).
            sq = torch.sub(x, out).square_().mul_(w)
        return 0.5 * sq.sum(-1) + (log_sigma + 0.5 * LOG_2PI).sum()

    def mean(self, out: Tensor) -> Tensor:
        return out

    def describe(self) -> str:
        """The likelihood as reported beside figures: its variance says what the nats mean."""
        sigma = self._log_sigma().detach().exp()
        if not self.learned:
            return f"gaussian (fixed sigma {sigma[0].item():.3g})"
        return (
            f"gaussian (learned sigma per dimension: mean {sigma.mean().item():.3g}, "
            f"floor {self.sigma_min:g})"
        )

    def sample(self, out: Tensor) -> Tensor:
        return out + torch.randn_like(out) * self._log_sigma().exp()

    def check(self, x: Tensor) -> None:
        pass


class BernoulliLikelihood(nn.Module):
    name = "bernoulli"

    def nll(self, x: Tensor, out: Tensor) -> Tensor:
        x = x.expand_as(out)
        return F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(-1)

    def mean(self, out: Tensor) -> Tensor:
        return torch.sigmoid(out)

    def describe(self) -> str:
        return "bernoulli"

    def sample(self, out: Tensor) -> Tensor:
        return torch.bernoulli(torch.sigmoid(out))

    def check(self, x: Tensor) -> None:
        # Cross-entropy on grey values is not a likelihood of anything; refuse rather than
        # report a number that looks like nats but is not.
        if not bool(((x == 0) | (x == 1)).all()):
            raise DataError(
                "bernoulli likelihood needs binary data (0/1) but got grey values; "
                "binarize the data (data.binarize: true) or use likelihood 'gaussian'"
            )


def build_likelihood(cfg: ModelConfig) -> nn.Module:
    if cfg.likelihood == "bernoulli":
        return BernoulliLikelihood()
    return GaussianLikelihood(cfg.input_dim, cfg.sigma, cfg.variance == "learned", cfg.sigma_min)
