"""The three formulas of the VAE, named as in the notes."""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_2PI = math.log(2 * math.pi)


def reparameterize(
    mu: Tensor, logvar: Tensor, n_samples: int = 1, eps: Tensor | None = None
) -> Tensor:
    """z = mu + sigma * eps, eps ~ N(0, I); returns shape (n_samples, *mu.shape).

    The noise is drawn outside the graph, so gradients reach mu and logvar; eps, when given,
    is that noise (shape (n_samples, *mu.shape)), e.g. vae.keyed_noise's per-example draws.
    """
    std = torch.exp(0.5 * logvar)
    if eps is None:
        eps = torch.randn((n_samples, *mu.shape), dtype=mu.dtype, device=mu.device)
    return mu + std * eps


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag sigma^2) || N(0, I)) per latent dimension, in closed form:

    1/2 * (-log sigma_j^2 + sigma_j^2 + mu_j^2 - 1). Sum over the last axis for the total.
    """
    return 0.5 * (-logvar + logvar.exp() + mu.pow(2) - 1.0)


def log_normal(x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(x; mu, diag exp(logvar)), summed over the last axis."""
    return -0.5 * (LOG_2PI + logvar + (x - mu).pow(2) / logvar.exp()).sum(-1)


def log_standard_normal(x: Tensor) -> Tensor:
    """log N(x; 0, I), summed over the last axis."""
    return -0.5 * (LOG_2PI + x.pow(2)).sum(-1)
