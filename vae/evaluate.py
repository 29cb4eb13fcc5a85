"""Held-out evaluation: every figure per example, in nats, under the model's decoder likelihood."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

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


def iter_batches(data: Tensor | Iterable, batch_size: int | None = None) -> Iterator[Tensor]:
    """Batches from a tensor, or from an iterator of tensors, (x, ...) tuples or {'x': ...} dicts.

    A tensor is split into batch_size rows at a time (None: one batch).
    """
    if isinstance(data, Tensor):
        step = batch_size or max(1, data.shape[0])
        for start in range(0, data.shape[0], step):
            yield data[start : start + step]
        return
    for item in data:
        if isinstance(item, dict):
            item = item["x"]
        elif isinstance(item, (tuple, list)):
            item = item[0]
        yield item


class _Totals:
    """Sums over the evaluated examples, in float64, from which the per-example figures come."""

    def __init__(self, latent_dim: int) -> None:
        self.n = 0
        self.recon = self.kl = self.iw = 0.0
        self.per_example: list[Tensor] = []
        self.kl_dim = torch.zeros(latent_dim, dtype=torch.float64)
        self.mu_sum = torch.zeros(latent_dim, dtype=torch.float64)
        self.mu_sq = torch.zeros(latent_dim, dtype=torch.float64)

    def add(self, out, log_px: Tensor | None) -> None:
        self.n += out.recon_loss.shape[0]
        self.per_example.append(neg_elbo(out.recon_loss, out.kl).double().cpu())
        self.recon += out.recon_loss.double().sum().item()
        self.kl += out.kl.double().sum().item()
        if out.logvar is not None:  # variational: a posterior to summarise
            self.kl_dim += kl_divergence(out.mu, out.logvar).double().sum(0).cpu()
            mu = out.mu.double().cpu()
            self.mu_sum += mu.sum(0)
            self.mu_sq += mu.pow(2).sum(0)
        if log_px is not None:
            self.iw += -log_px.sum().item()

    def result(self, cfg, iw_k: int) -> EvalResult:
        n = self.n
        if n == 0:
            raise DataError("evaluation data is empty; check the held-out split or shards")
        likelihood, variational = cfg.likelihood, cfg.variational
        result = EvalResult(
            likelihood=likelihood,
            objective=cfg.objective_name,
            n_examples=n,
            neg_elbo=neg_elbo(self.recon, self.kl) / n,
            recon_nll=self.recon / n,
            kl=self.kl / n,
            per_example_neg_elbo=torch.cat(self.per_example),
        )
        if variational:
            var = (self.mu_sq / n - (self.mu_sum / n).pow(2)).clamp(min=0)
            result.posterior_mean_variance = var.tolist()
            result.active_units = int((var > ACTIVE_UNIT_THRESHOLD).sum())
            result.kl_per_dim = (self.kl_dim / n).tolist()
            if iw_k > 0:
                result.iw_nll = self.iw / n
                result.iw_k = iw_k
        return result


@torch.no_grad()
def evaluate(
    model: Autoencoder,
    data: Tensor | Iterable,
    iw_k: int = 0,
    batch_size: int = 256,
    mc_samples: int | None = None,
    seed: int = 0,
) -> EvalResult:
    """-ELBO, reconstruction NLL, KL, IW estimate of -log p(x) (iw_k > 0), active units, KL per dim.

    Deterministic for a given seed; the global RNG state is left as it was.
    """
    cfg = model.config
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = _Totals(cfg.latent_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for x in iter_batches(data, batch_size):
            x = model.prepare_input(x.to(device))
            out = model(x, kl_weight=1.0, n_samples=mc_samples)
            log_px = None
            if cfg.variational and iw_k > 0:
                chunk = max(1, _IW_BUDGET // max(1, x.shape[0] * cfg.input_dim))
                log_w = model.log_importance_weights(x, iw_k, chunk_size=chunk).double()
                log_px = iw_log_likelihood(log_w)
            totals.add(out, log_px)
    model.train(was_training)
    result = totals.result(cfg, iw_k)
    result.decoder = model.likelihood.describe()
    return result
