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
    n = 0
    sums = {"recon": 0.0, "kl": 0.0, "iw": 0.0}
    per_example: list[Tensor] = []
    kl_dim = torch.zeros(cfg.latent_dim, dtype=torch.float64)
    mu_sum = torch.zeros(cfg.latent_dim, dtype=torch.float64)
    mu_sq = torch.zeros(cfg.latent_dim, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for x in iter_batches(data, batch_size):
            x = model.prepare_input(x.to(device))
            b = x.shape[0]
            out = model(x, kl_weight=1.0, n_samples=mc_samples)
            per_example.append(neg_elbo(out.recon_loss, out.kl).double().cpu())
            sums["recon"] += out.recon_loss.double().sum().item()
            sums["kl"] += out.kl.double().sum().item()
            if cfg.variational:
                kl_dim += kl_divergence(out.mu, out.logvar).double().sum(0).cpu()
                mu = out.mu.double().cpu()
                mu_sum += mu.sum(0)
                mu_sq += mu.pow(2).sum(0)
                if iw_k > 0:
                    chunk = max(1, _IW_BUDGET // max(1, b * cfg.input_dim))
                    log_w = model.log_importance_weights(x, iw_k, chunk_size=chunk).double()
                    sums["iw"] += -iw_log_likelihood(log_w).sum().item()
            n += b
    model.train(was_training)
    if n == 0:
        raise DataError("evaluation data is empty; check the held-out split or shards")
    result = EvalResult(
        likelihood=cfg.likelihood,
        n_examples=n,
        neg_elbo=neg_elbo(sums["recon"], sums["kl"]) / n,
        recon_nll=sums["recon"] / n,
        kl=sums["kl"] / n,
        per_example_neg_elbo=torch.cat(per_example),
    )
    if cfg.variational:
        var = (mu_sq / n - (mu_sum / n).pow(2)).clamp(min=0)
        result.posterior_mean_variance = var.tolist()
        result.active_units = int((var > ACTIVE_UNIT_THRESHOLD).sum())
        result.kl_per_dim = (kl_dim / n).tolist()
        if iw_k > 0:
            result.iw_nll = sums["iw"] / n
            result.iw_k = iw_k
    return result
