"""One model class for the family: AE, DAE (AE on corrupted inputs), VAE and beta-VAE.

Every forward returns a ModelOutput with the same fields, so training and evaluation code never
branch on the kind of model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vae.config import ModelConfig
from vae.distributions import kl_divergence, log_normal, log_standard_normal, reparameterize
from vae.errors import DataError
from vae.keyed_noise import keyed_normal
from vae.likelihoods import build_likelihood
from vae.networks import build_decoder, build_encoder
from vae.objectives import iw_log_likelihood, neg_elbo


@dataclass
class ModelOutput:
    loss: Tensor  # scalar training objective, mean per example
    recon_loss: Tensor  # (B,) reconstruction NLL in nats, averaged over the L samples
    kl: Tensor  # (B,) KL(q(z|x) || N(0, I)); zeros for AE/DAE
    recon_x: Tensor  # (B, *input_shape) mean of p(x|z) for the first sample
    z: Tensor  # (L, B, latent) samples (AE: (1, B, latent) codes)
    mu: Tensor | None = None
    logvar: Tensor | None = None


class Autoencoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config)
        feat = self.encoder.out_features
        if config.variational:
            self.mu_head = nn.Linear(feat, config.latent_dim)
            self.logvar_head = nn.Linear(feat, config.latent_dim)
        else:
            self.code_head = nn.Linear(feat, config.latent_dim)
        self.decoder = build_decoder(config)
        self.likelihood = build_likelihood(config)

    # -- checks -------------------------------------------------------------------------------
    def prepare_input(self, x: Tensor) -> Tensor:
        """Validate a batch and give it the model's example shape."""
        shape = self.config.input_shape
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.config.input_dim:
            got = tuple(x.shape[1:]) if x.dim() >= 2 else tuple(x.shape)
            raise DataError(
                f"data has example shape {got} but the model expects {shape} "
                f"({self.config.input_dim} values); pass batches of shape (B, {', '.join(map(str, shape))}) "
                "or set model.input_shape to match the data"
            )
        if not x.is_floating_point():
            x = x.float()
        if not bool(torch.isfinite(x).all()):
            raise DataError("data contains NaN or infinite values; clean or re-stage the data")
        self.likelihood.check(x)
        return x.reshape(x.shape[0], *shape)

    def corrupt(self, x: Tensor, noise_seeds: Tensor | None = None) -> Tensor:
        """DAE perturbation: additive Gaussian noise and random masking of input values. With
        noise_seeds, each example's perturbation is its own (as its z samples are)."""
        noise = self.config.noise
        if noise.gaussian_std > 0:
            x = x + noise.gaussian_std * _input_noise(noise_seeds, x)
        if noise.mask_prob > 0:
            x = x * (_input_noise(noise_seeds, x, uniform=True) >= noise.mask_prob).to(x.dtype)
        return x

    # -- the model ----------------------------------------------------------------------------
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Returns (mu, logvar) of q(z|x); for AE/DAE (code, None)."""
        h = self.encoder(x)
        if self.config.variational:
            return self.mu_head(h), self.logvar_head(h)
        return self.code_head(h), None

    def decode(self, z: Tensor) -> Tensor:
        """Decoder output (Gaussian means or Bernoulli logits), flattened: (..., B, D)."""
        return self.decoder(z)

    def forward(
        self,
        x: Tensor,
        kl_weight: float | None = None,
        n_samples: int | None = None,
        noise_seeds: Tensor | None = None,
    ) -> ModelOutput:
        """noise_seeds (B,) int64: each example's z samples come from its own seed
        (vae.keyed_noise), not from the global random stream."""
        x = self.prepare_input(x)
        active = self.training and self.config.noise.active
        x_in = self.corrupt(x, noise_seeds) if active else x
        target = x.flatten(1)
        mu, logvar = self.encode(x_in)
        if logvar is None:
            z = mu.unsqueeze(0)
            kl_dims = torch.zeros_like(mu)
        else:
            n = n_samples or self.config.mc_samples
            z = reparameterize(mu, logvar, n, _noise(noise_seeds, n, mu))
            kl_dims = kl_divergence(mu, logvar)
        out = self.decode(z)
        nll = self.likelihood.nll(target, out)  # (L, B)
        weight = self.config.beta if kl_weight is None else kl_weight
        loss = self._objective(nll, kl_dims, z, mu, logvar, weight)
        recon_x = self.likelihood.mean(out[0]).reshape(x.shape)
        return ModelOutput(loss, nll.mean(0), kl_dims.sum(-1), recon_x, z, mu, logvar)

    def _objective(self, nll, kl_dims, z, mu, logvar, weight: float) -> Tensor:
        """The scalar training loss, mean per example, as config.objective says."""
        cfg = self.config
        if cfg.objective == "iwae" and z.shape[0] > 1:
            # log w_i = log p(x|z_i) + weight * (log p(z_i) - log q(z_i|x)); weight 1 is the
            # true bound, smaller values (KL warm-up) soften the prior's pull as for the ELBO.
            log_ratio = log_standard_normal(z) - log_normal(z, mu, logvar)
            return -iw_log_likelihood(-nll + weight * log_ratio).mean()
        # k = 1 falls through on purpose: the closed-form KL has less variance than a sampled one.
        recon = nll.mean(0)
        if cfg.free_bits > 0 and self.training:
            floored = kl_dims.mean(0).clamp(min=cfg.free_bits).sum()
            return recon.mean() + weight * floored
        return neg_elbo(recon, kl_dims.sum(-1), weight).mean()

    @torch.no_grad()
    def embed(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Posterior mean (and log-variance) for downstream use; no sampling, no corruption."""
        return self.encode(self.prepare_input(x))

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """Draw z from the prior and return the decoder's mean image, shape (n, *input_shape)."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.config.latent_dim, device=device)
        return self.likelihood.mean(self.decode(z)).reshape(n, *self.config.input_shape)

    def log_importance_weights(
        self,
        x: Tensor,
        k: int,
        chunk_size: int | None = None,
        noise_seeds: Tensor | None = None,
    ) -> Tensor:
        """log p(x|z_i) + log p(z_i) - log q(z_i|x) for k samples z_i ~ q(z|x); shape (k, B).

        The k samples are decoded chunk_size at a time, so k=1000 fits in memory; with
        noise_seeds the samples are each example's own and do not depend on chunk_size.
        """
        if not self.config.variational:
            raise DataError("importance weights need a variational model (kind vae or beta_vae)")
        x = self.prepare_input(x)
        target = x.flatten(1)
        mu, logvar = self.encode(x)
        chunk = k if chunk_size is None else max(1, chunk_size)
        parts = []
        for start in range(0, k, chunk):
            n = min(chunk, k - start)
            z = reparameterize(mu, logvar, n, _noise(noise_seeds, n, mu, start))
            log_px_z = -self.likelihood.nll(target, self.decode(z))
            parts.append(log_px_z + log_standard_normal(z) - log_normal(z, mu, logvar))
        return torch.cat(parts, 0)


def _input_noise(seeds: Tensor | None, x: Tensor, uniform: bool = False) -> Tensor:
    """N(0, 1) (or U(0, 1)) per input value. With seeds, each example's row from a CPU generator
    seeded from its own seed (2s or 2s + 1: the Gaussian and the mask never share a stream):
    about 8 microseconds a row, where the counter-based z noise would cost 100 for 784 values."""
    if seeds is None:
        return torch.rand_like(x) if uniform else torch.randn_like(x)
    out = torch.empty((x.shape[0], x[0].numel()), dtype=torch.float32)
    gen = torch.Generator()
    for row, seed in enumerate(seeds.tolist()):
        gen.manual_seed((2 * seed + uniform) % 2**64)
        out[row].uniform_(generator=gen) if uniform else out[row].normal_(generator=gen)
    return out.reshape(x.shape).to(device=x.device, dtype=x.dtype)


def _noise(seeds: Tensor | None, n: int, mu: Tensor, start: int = 0) -> Tensor | None:
    if seeds is None:
        return None
    return keyed_normal(seeds.to(mu.device), n, mu.shape[-1], start, mu.dtype)


def build_model(config: ModelConfig, seed: int | None = None) -> Autoencoder:
    """Build a model; with a seed its initial weights are reproducible (global RNG untouched)."""
    if seed is None:
        return Autoencoder(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Autoencoder(config)
