"""The bounds a VAE is trained and judged by, per example, in nats."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def elbo(recon_nll: Tensor, kl: Tensor) -> Tensor:
    """ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z)), per example."""
    return -(recon_nll + kl)


def neg_elbo(recon_nll: Tensor | float, kl: Tensor | float, beta: float = 1.0) -> Tensor | float:
    """-ELBO = E_q[-log p(x|z)] + beta * KL, per example: the loss (beta = 1 is the true bound;
    a beta-VAE or KL warm-up weighs the KL term)."""
    return recon_nll + beta * kl


def iw_log_likelihood(log_weights: Tensor) -> Tensor:
    """The k-sample importance-weighted estimate of log p(x) (the IWAE bound), per example:
    log (1/k sum_i w_i) for log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x), z_i ~ q(z|x).

    log_weights has shape (k, B). It is the ELBO for k = 1, never below the mean of the log
    weights (Jensen), and tightens towards log p(x) as k grows.
    """
    return torch.logsumexp(log_weights, 0) - math.log(log_weights.shape[0])
