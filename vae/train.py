"""A single-process training loop. It knows nothing of Ray: the distributed layer calls
`train_one_epoch` and `validate` with its own loaders and a DDP-wrapped model, and keeps the
per-epoch rules (KL warm-up, best epoch, early stopping) in the same `TrainingState` as `fit`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from vae.config import TrainConfig
from vae.errors import DataError, NonFiniteLossError
from vae.evaluate import iter_batches


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float  # mean training objective per example (with the epoch's KL weight)
    val_neg_elbo: float  # validation -ELBO per example, nats (-IWAE bound for objective iwae)
    kl_weight: float


@dataclass
class FitResult:
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = -1
    best_val_neg_elbo: float = math.inf
    best_state: dict[str, Tensor] | None = None
    stopped_early: bool = False


@dataclass
class TrainingState:
    """The per-epoch rules of a run and where it stands: KL warm-up, best epoch, early stopping.

    The rules' settings come from the TrainConfig (and the model's beta); the progress
    (next epoch, best value and epoch, epochs without improvement) round-trips through
    `to_dict`/`from_dict` as plain JSON values, so a checkpointed run resumes with the same
    decisions. Each epoch of `remaining_epochs()` must end with `update(val_neg_elbo)`.
    """

    cfg: TrainConfig
    beta: float = 1.0
    epoch: int = 0  # the next epoch to run
    best_epoch: int = -1
    best_val_neg_elbo: float = math.inf
    epochs_without_improvement: int = 0

    def kl_weight(self, epoch: int) -> float:
        return kl_weight_for_epoch(epoch, self.beta, self.cfg.kl_warmup_epochs)

    def past_warmup(self, epoch: int) -> bool:
        """Only an epoch at the full KL weight can be best: warm-up optimises another objective."""
        return self.kl_weight(epoch) == self.beta

    def update(self, val_neg_elbo: float) -> bool:
        """Record the epoch just run; True if it is the new best (by more than min_delta)."""
        epoch, self.epoch = self.epoch, self.epoch + 1
        if not self.past_warmup(epoch):
            return False
        if val_neg_elbo < self.best_val_neg_elbo - self.cfg.min_delta:
            self.best_epoch, self.best_val_neg_elbo = epoch, val_neg_elbo
            self.epochs_without_improvement = 0
            return True
        self.epochs_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        """Early stopping: `early_stopping_patience` full-weight epochs without a better -ELBO."""
        patience = self.cfg.early_stopping_patience
        return patience is not None and self.epochs_without_improvement >= patience

    @property
    def finished(self) -> bool:
        return self.epoch >= self.cfg.epochs or self.should_stop

    def remaining_epochs(self) -> Iterator[int]:
        """The epochs still to run; each must end with `update`, or this would repeat it."""
        while not self.finished:
            epoch = self.epoch
            yield epoch
            if self.epoch == epoch:
                raise RuntimeError(
                    f"epoch {epoch} ended without TrainingState.update(val_neg_elbo); call it "
                    "once at the end of every epoch"
                )

    def to_dict(self) -> dict[str, int | float | None]:
        best = self.best_val_neg_elbo
        return {
            "epoch": self.epoch,
            "best_epoch": self.best_epoch,
            "best_val_neg_elbo": None if math.isinf(best) else best,
            "epochs_without_improvement": self.epochs_without_improvement,
        }

    @classmethod
    def from_dict(
        cls, data: dict[str, int | float | None], cfg: TrainConfig, beta: float = 1.0
    ) -> TrainingState:
        """Progress from `to_dict`, rules from `cfg`: a resumed run may be given more epochs."""
        best = data["best_val_neg_elbo"]
        return cls(
            cfg,
            beta,
            epoch=int(data["epoch"]),
            best_epoch=int(data["best_epoch"]),
            best_val_neg_elbo=math.inf if best is None else float(best),
            epochs_without_improvement=int(data["epochs_without_improvement"]),
        )


@dataclass
class StepRuntime:
    """How a training step runs on this device and cluster.

    autocast_dtype (bf16/fp16) turns on mixed precision on CUDA; fp16 also wants a GradScaler.
    all_finite decides whether a step's losses are usable; distributed callers pass one that
    agrees across ranks, so every rank stops at the same step instead of one waiting on the
    others. no_sync: a context in which a backward pass only accumulates gradients (DDP's
    `no_sync`), entered for every part of a step but the last.
    """

    autocast_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    all_finite: Callable[[Tensor], bool] = field(
        default=lambda loss: bool(torch.isfinite(loss).all())
    )
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@dataclass
class MicroBatch:
    """One part of an optimiser step's batch. A step of several parts runs a backward pass per
    part and steps once on the summed gradients: how one data-parallel rank does the work of
    several, bit for bit (the gradient of each part is computed alone, as a rank of its own
    would, then added). weight multiplies the part's mean loss before backward, so the parts'
    gradients add up to that of the whole batch's mean; noise_seeds (B,) gives each example its
    own z samples (vae.keyed_noise), the same wherever the example is computed."""

    x: Tensor
    weight: float = 1.0
    noise_seeds: Tensor | None = None


def _steps(batches: Iterable) -> Iterator[Sequence[MicroBatch]]:
    """Each item as a step's parts: a sequence of MicroBatch as is, anything else (a tensor, a
    tuple, a {'x': ...} dict) as one part of weight 1."""
    for item in [batches] if isinstance(batches, Tensor) else batches:
        if isinstance(item, MicroBatch):
            yield [item]
        elif isinstance(item, (list, tuple)) and item and isinstance(item[0], MicroBatch):
            yield item
        else:
            yield [MicroBatch(next(iter_batches([item])))]


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


def in_parts(batches: Iterable[Tensor], parts: int) -> Iterator[Tensor | list[MicroBatch]]:
    """Each batch as `parts` micro-batches weighted by their share (the last batch of an epoch
    may be short and cut unevenly); one part: the batch as is."""
    for x in batches:
        if parts == 1:
            yield x
        else:
            chunks = [c for c in x.tensor_split(parts) if c.shape[0]]
            yield [MicroBatch(c, c.shape[0] / x.shape[0]) for c in chunks]


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable,
    epoch: int,
    kl_weight: float,
    cfg: TrainConfig | None = None,
    runtime: StepRuntime | None = None,
) -> tuple[float, int]:
    """One pass over `batches`; returns (mean training objective per example, examples seen).

    Each item is one optimiser step: a batch (tensor, tuple or dict) or a sequence of
    MicroBatch parts. cfg supplies grad_clip_norm (None: no clipping); runtime says how a step
    runs (StepRuntime).
    """
    clip = cfg.grad_clip_norm if cfg is not None else None
    rt = runtime or StepRuntime()
    model.train()
    total, count = 0.0, 0
    for step, parts in enumerate(_steps(batches)):
        optimizer.zero_grad(set_to_none=True)
        losses = _backward_parts(model, parts, kl_weight, rt)
        if not rt.all_finite(losses):
            bad = losses[~torch.isfinite(losses)]  # none here when another rank's loss is bad
            raise NonFiniteLossError(
                f"loss became {(bad if len(bad) else losses)[0].item()} at epoch {epoch}, "
                f"step {step}; lower the learning rate, enable grad clipping, or check the data "
                "for extreme values"
            )
        if rt.scaler is not None:
            rt.scaler.unscale_(optimizer)
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        if rt.scaler is not None:
            rt.scaler.step(optimizer)
            rt.scaler.update()
        else:
            optimizer.step()
        sizes = [p.x.shape[0] for p in parts]
        total += sum(loss * b for loss, b in zip(losses.tolist(), sizes, strict=True))
        count += sum(sizes)
    if count == 0:
        raise DataError(f"epoch {epoch} saw no training batches; check the training split")
    return total / count, count


def _forward_args(kl_weight: float, part: MicroBatch) -> dict:
    """noise_seeds only when given: a model of the caller's own need not take them."""
    if part.noise_seeds is None:
        return {"kl_weight": kl_weight}
    return {"kl_weight": kl_weight, "noise_seeds": part.noise_seeds}


def _backward_parts(
    model: nn.Module, parts: Sequence[MicroBatch], kl_weight: float, rt: StepRuntime
) -> Tensor:
    """Forward and backward of each part, gradients accumulating (synchronised across ranks at
    the last part only); returns the parts' mean losses, unweighted. A non-finite loss is
    caught by the caller before the optimiser steps: its gradients are never applied."""
    losses = []
    for i, part in enumerate(parts):
        quiet = rt.no_sync if i < len(parts) - 1 else contextlib.nullcontext
        with quiet():
            dtype = rt.autocast_dtype
            with torch.autocast(part.x.device.type, dtype=dtype, enabled=dtype is not None):
                out = model(part.x, **_forward_args(kl_weight, part))
            loss = out.loss * part.weight if part.weight != 1.0 else out.loss
            (rt.scaler.scale(loss) if rt.scaler is not None else loss).backward()
        losses.append(out.loss.detach().float())
    return torch.stack(losses)


@torch.no_grad()
def validate(model: nn.Module, batches: Iterable) -> tuple[float, int]:
    """Validation score summed and example count (sums let ranks be averaged exactly): the
    -ELBO, or for objective iwae the -IWAE bound the model is trained on. Selecting an IWAE
    model by its ELBO would be wrong: the k-sample bound improves while the ELBO may worsen
    (seen on digits with k=50: early stopping kept epoch 2)."""
    model.eval()
    cfg = getattr(model, "config", None)
    iwae = cfg is not None and cfg.objective == "iwae" and cfg.mc_samples > 1
    total, count = 0.0, 0
    for part in (p for parts in _steps(batches) for p in parts):
        x = part.x
        out = model(x, **_forward_args(1.0, part))
        if iwae:
            total += out.loss.double().item() * x.shape[0]
        else:
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
    state = TrainingState(cfg, beta=getattr(getattr(model, "config", None), "beta", 1.0))
    optimizer = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    result = FitResult()
    for epoch in state.remaining_epochs():
        w = state.kl_weight(epoch)
        batches = in_parts(shuffled_batches(train_x, cfg.batch_size, gen), cfg.batch_parts or 1)
        train_loss, _ = train_one_epoch(model, optimizer, batches, epoch, w, cfg)
        val_total, val_n = validate(model, iter_batches(val_x, cfg.batch_size))
        record = EpochRecord(epoch, train_loss, val_total / val_n, w)
        result.history.append(record)
        if on_epoch_end is not None:
            on_epoch_end(record)
        if state.update(record.val_neg_elbo):
            result.best_state = copy.deepcopy(model.state_dict())
    result.best_epoch, result.best_val_neg_elbo = state.best_epoch, state.best_val_neg_elbo
    result.stopped_early = state.should_stop
    if result.best_state is not None:
        model.load_state_dict(result.best_state)
    return result
