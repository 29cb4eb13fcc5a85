"""A single-process training loop. It knows nothing of Ray: the distributed layer calls
`train_one_epoch` and `validate` with its own loaders and a DDP-wrapped model.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from vae.errors import ConfigError, DataError, NonFiniteLossError
from vae.evaluate import iter_batches


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    # KL weight rises linearly from 0 to beta over this many epochs (0: no warm-up).
    kl_warmup_epochs: int = 0
    grad_clip_norm: float | None = 10.0
    # Stop after this many epochs without a better validation -ELBO (None: never).
    early_stopping_patience: int | None = 10
    min_delta: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(
                f"train config: epochs ({self.epochs}) and batch_size ({self.batch_size}) "
                "must be positive"
            )
        if self.lr <= 0 or self.kl_warmup_epochs < 0:
            raise ConfigError("train config: lr must be positive and kl_warmup_epochs >= 0")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ConfigError("train config: grad_clip_norm must be positive or null")


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float  # mean training objective per example (with the epoch's KL weight)
    val_neg_elbo: float  # validation -ELBO per example, nats
    kl_weight: float


@dataclass
class FitResult:
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = -1
    best_val_neg_elbo: float = math.inf
    best_state: dict[str, Tensor] | None = None
    stopped_early: bool = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def kl_weight_for_epoch(epoch: int, beta: float, warmup_epochs: int) -> float:
    """Linear KL warm-up: epoch 0 gets beta/warmup, reaching beta after warmup_epochs."""
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, (epoch + 1) / warmup_epochs)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def shuffled_batches(x: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    order = torch.randperm(x.shape[0], generator=generator)
    for start in range(0, x.shape[0], batch_size):
        yield x[order[start : start + batch_size]]


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable,
    epoch: int,
    kl_weight: float,
    grad_clip_norm: float | None = None,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    all_finite: Callable[[Tensor], bool] | None = None,
) -> tuple[float, int]:
    """One pass over `batches`; returns (mean training objective per example, examples seen).

    autocast_dtype (bf16/fp16) turns on mixed precision on CUDA; fp16 also wants a GradScaler.
    all_finite decides whether a loss is usable; distributed callers pass one that agrees across
    ranks, so every rank stops at the same step instead of one waiting on the others.
    """
    all_finite = all_finite or (lambda loss: bool(torch.isfinite(loss)))
    model.train()
    total, count = 0.0, 0
    for step, x in enumerate(iter_batches(batches)):
        with torch.autocast(
            x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
        ):
            out = model(x, kl_weight=kl_weight)
        loss = out.loss
        if not all_finite(loss.detach()):
            raise NonFiniteLossError(
                f"loss became {loss.item()} at epoch {epoch}, step {step}; lower the learning "
                "rate, enable grad clipping, or check the data for extreme values"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        b = x.shape[0]
        total += loss.item() * b
        count += b
    if count == 0:
        raise DataError(f"epoch {epoch} saw no training batches; check the training split")
    return total / count, count


@torch.no_grad()
def validate(model: nn.Module, batches: Iterable) -> tuple[float, int]:
    """Validation -ELBO summed and example count (sums let ranks be averaged exactly)."""
    model.eval()
    total, count = 0.0, 0
    for x in iter_batches(batches):
        out = model(x, kl_weight=1.0)
        total += (out.recon_loss + out.kl).double().sum().item()
        count += x.shape[0]
    return total, count


def fit(
    model: nn.Module,
    train_x: Tensor,
    val_x: Tensor,
    cfg: TrainConfig,
    on_epoch_end: Callable[[EpochRecord], None] | None = None,
) -> FitResult:
    """Train on in-memory tensors with early stopping on validation -ELBO.

    Seeded and deterministic on CPU. The model is left holding the best weights.
    """
    seed_everything(cfg.seed)
    if len(train_x) == 0 or len(val_x) == 0:
        raise DataError("training and validation data must both be non-empty")
    beta = getattr(getattr(model, "config", None), "beta", 1.0)
    optimizer = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    result = FitResult()
    stopper = EarlyStopping(cfg.early_stopping_patience, cfg.min_delta)
    for epoch in range(cfg.epochs):
        w = kl_weight_for_epoch(epoch, beta, cfg.kl_warmup_epochs)
        batches = shuffled_batches(train_x, cfg.batch_size, gen)
        train_loss, _ = train_one_epoch(model, optimizer, batches, epoch, w, cfg.grad_clip_norm)
        val_total, val_n = validate(model, iter_batches(val_x, cfg.batch_size))
        record = EpochRecord(epoch, train_loss, val_total / val_n, w)
        result.history.append(record)
        if on_epoch_end is not None:
            on_epoch_end(record)
        # Only a full-weight epoch can be "best": a warm-up epoch optimises a different objective.
        if w == beta and stopper.improved(record.val_neg_elbo):
            result.best_epoch = epoch
            result.best_val_neg_elbo = record.val_neg_elbo
            result.best_state = copy.deepcopy(model.state_dict())
        if stopper.should_stop:
            result.stopped_early = True
            break
    if result.best_state is not None:
        model.load_state_dict(result.best_state)
    return result


class EarlyStopping:
    """Tracks the best validation loss; `should_stop` after `patience` epochs without progress."""

    def __init__(self, patience: int | None, min_delta: float = 0.0) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best = math.inf
        self.bad_epochs = 0

    def improved(self, value: float) -> bool:
        if value < self.best - self.min_delta:
            self.best = value
            self.bad_epochs = 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience
