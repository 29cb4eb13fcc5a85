"""Held-out evaluation: every figure per example, in nats, under the model's decoder likelihood."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from vae.distributions import kl_divergence
from vae.errors import DataError
from vae.model import Autoencoder
from vae.objectives import iw_log_likelihood, neg_elbo

ACTIVE_UNIT_THRESHOLD = 0.01
# Decoder outputs held at once while importance sampling: chunk * batch * D values.
_IW_BUDGET = 1 << 24


@dataclass
class EvalResult:
    likelihood: str
    n_examples: int
    neg_elbo: float  # -ELBO per example (beta = 1, whatever the training weight was)
    recon_nll: float  # E_q[-log p(x|z)] per example
    kl: float  # KL(q(z|x) || N(0, I)) per example
    objective: str = "elbo"  # what trained the model (config.objective_name); figures are not it
    decoder: str = ""  # the likelihood with its variance, e.g. "gaussian (fixed sigma 0.1)"
    iw_nll: float | None = None  # -log p(x) by importance weighting with iw_k samples
    iw_k: int | None = None
    iw_examples: int | None = None  # how many examples the IW estimate averages over
    iw_nll_se: float | None = None  # its standard error over those examples
    active_units: int | None = None
    kl_per_dim: list[float] = field(default_factory=list)
    posterior_mean_variance: list[float] = field(default_factory=list)
    # Per-example -ELBO, kept for paired comparisons; not part of the JSON summary.
    per_example_neg_elbo: Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("per_example_neg_elbo")
        d["units"] = "nats per example"
        return d


class Batch(NamedTuple):
    """One batch to score: x, and optionally each example's noise seed (int64, see
    vae.keyed_noise) and whether the IW estimate includes it (bool)."""

    x: Tensor
    noise_seeds: Tensor | None = None
    iw: Tensor | None = None


def iter_batches(data: Tensor | Iterable, batch_size: int | None = None) -> Iterator[Tensor]:
    """Batches from a tensor, or from an iterator of tensors, (x, ...) tuples or {'x': ...} dicts.

    A tensor is split into batch_size rows at a time (None: one batch).
    """
    for batch in _scoring_batches(data, batch_size):
        yield batch.x


def _scoring_batches(data: Tensor | Iterable, batch_size: int | None = None) -> Iterator[Batch]:
    if isinstance(data, Tensor):
        step = batch_size or max(1, data.shape[0])
        for start in range(0, data.shape[0], step):
            yield Batch(data[start : start + step])
        return
    for item in data:
        if isinstance(item, Batch):
            yield item
        elif isinstance(item, dict):
            yield Batch(item["x"], item.get("noise_seeds"), item.get("iw"))
        elif isinstance(item, (tuple, list)):
            yield Batch(item[0])
        else:
            yield Batch(item)


class EvalSums:
    """Sums over scored examples, in float64, from which the per-example figures come. Sums of
    disjoint parts (shards scored on different workers) merge into those of the whole."""

    def __init__(self, latent_dim: int, per_example: bool = True) -> None:
        self.n = 0
        self.recon = self.kl = 0.0
        self.iw_n, self.iw_sum, self.iw_sq = 0, 0.0, 0.0  # of -log p(x) over the IW examples
        self.per_example: list[Tensor] | None = [] if per_example else None
        self.kl_dim = torch.zeros(latent_dim, dtype=torch.float64)
        self.mu_sum = torch.zeros(latent_dim, dtype=torch.float64)
        self.mu_sq = torch.zeros(latent_dim, dtype=torch.float64)

    def add(self, out, neg_log_px: Tensor | None) -> None:
        self.n += out.recon_loss.shape[0]
        if self.per_example is not None:
            self.per_example.append(neg_elbo(out.recon_loss, out.kl).double().cpu())
        self.recon += out.recon_loss.double().sum().item()
        self.kl += out.kl.double().sum().item()
        if out.logvar is not None:  # variational: a posterior to summarise
            self.kl_dim += kl_divergence(out.mu, out.logvar).double().sum(0).cpu()
            mu = out.mu.double().cpu()
            self.mu_sum += mu.sum(0)
            self.mu_sq += mu.pow(2).sum(0)
        if neg_log_px is not None:
            self.iw_n += neg_log_px.shape[0]
            self.iw_sum += neg_log_px.sum().item()
            self.iw_sq += neg_log_px.pow(2).sum().item()

    def merge(self, other: EvalSums) -> EvalSums:
        self.n += other.n
        self.recon += other.recon
        self.kl += other.kl
        self.iw_n += other.iw_n
        self.iw_sum += other.iw_sum
        self.iw_sq += other.iw_sq
        if self.per_example is not None and other.per_example is not None:
            self.per_example.extend(other.per_example)
        self.kl_dim += other.kl_dim
        self.mu_sum += other.mu_sum
        self.mu_sq += other.mu_sq
        return self

    def per_example_neg_elbo(self) -> Tensor:
        parts = self.per_example or []
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def result(self, cfg, iw_k: int) -> EvalResult:
        n = self.n
        if n == 0:
            raise DataError("evaluation data is empty; check the held-out split or shards")
        result = EvalResult(
            likelihood=cfg.likelihood,
            objective=cfg.objective_name,
            n_examples=n,
            neg_elbo=neg_elbo(self.recon, self.kl) / n,
            recon_nll=self.recon / n,
            kl=self.kl / n,
            per_example_neg_elbo=self.per_example_neg_elbo()
            if self.per_example is not None
            else None,
        )
        if cfg.variational:
            var = (self.mu_sq / n - (self.mu_sum / n).pow(2)).clamp(min=0)
            result.posterior_mean_variance = var.tolist()
            result.active_units = int((var > ACTIVE_UNIT_THRESHOLD).sum())
            result.kl_per_dim = (self.kl_dim / n).tolist()
            if iw_k > 0 and self.iw_n > 0:
                m = self.iw_n
                mean = self.iw_sum / m
                result.iw_nll, result.iw_k, result.iw_examples = mean, iw_k, m
                # The standard error of the mean over the examples (not the Monte-Carlo error
                # of each example's estimate): how far a subsample's figure may be from the
                # whole split's.
                var = max(0.0, self.iw_sq / m - mean * mean) * m / max(1, m - 1)
                result.iw_nll_se = math.sqrt(var / m)
        return result


@torch.no_grad()
def score_batches(
    model: Autoencoder,
    data: Tensor | Iterable,
    iw_k: int = 0,
    batch_size: int = 256,
    mc_samples: int | None = None,
    seed: int = 0,
    per_example: bool = True,
) -> EvalSums:
    """The sums behind `evaluate` over data; batches may carry each example's noise seed and IW
    flag (Batch, or dicts with 'noise_seeds' and 'iw'). Without noise seeds the samples come
    from the global stream seeded by seed, whose state is left as it was."""
    cfg = model.config
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = EvalSums(cfg.latent_dim, per_example)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for batch in _scoring_batches(data, batch_size):
            x = model.prepare_input(batch.x.to(device))
            seeds = batch.noise_seeds
            out = model(x, kl_weight=1.0, n_samples=mc_samples, noise_seeds=seeds)
            neg_log_px = None
            if cfg.variational and iw_k > 0:
                rows = slice(None) if batch.iw is None else batch.iw.to(device).bool()
                neg_log_px = _neg_log_px(
                    model, x[rows], iw_k, None if seeds is None else seeds[rows]
                )
            sums.add(out, neg_log_px)
    model.train(was_training)
    return sums


def _neg_log_px(model: Autoencoder, x: Tensor, iw_k: int, seeds: Tensor | None) -> Tensor:
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)
    chunk = max(1, _IW_BUDGET // max(1, x.shape[0] * model.config.input_dim))
    log_w = model.log_importance_weights(x, iw_k, chunk_size=chunk, noise_seeds=seeds).double()
    return -iw_log_likelihood(log_w).cpu()


def evaluate(
    model: Autoencoder,
    data: Tensor | Iterable,
    iw_k: int = 0,
    batch_size: int = 256,
    mc_samples: int | None = None,
    seed: int = 0,
) -> EvalResult:
    """-ELBO, reconstruction NLL, KL, IW estimate of -log p(x) (iw_k > 0), active units, KL per dim.

    Deterministic for a given seed (or the batches' noise seeds); the global RNG state is left
    as it was.
    """
    sums = score_batches(model, data, iw_k, batch_size, mc_samples, seed)
    result = sums.result(model.config, iw_k)
    result.decoder = model.likelihood.describe()
    return result
