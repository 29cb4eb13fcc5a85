"""The loop each Ray Train worker runs. It reuses the `vae` library's epoch and validation steps;
this layer only shards data, wraps the model for DDP, averages metrics across ranks,
checkpoints and reports.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipelines.data.shards.loader import LoaderOptions, ShardLoader
from pipelines.data.shards.manifest import read_manifest
from pipelines.errors import PipelineError
from pipelines.storage import location
from pipelines.training.batch_parts import (
    part_size,
    part_weight,
    rank_parts,
    train_noise_seeds,
    val_noise_seeds,
)
from vae import (
    MicroBatch,
    ModelConfig,
    NonFiniteLossError,
    StepRuntime,
    StorageError,
    TrainConfig,
    TrainingState,
    build_model,
    save_model,
    train_one_epoch,
    validate,
)
from vae.train import EpochRecord, make_optimizer

log = logging.getLogger("vae_pipeline.train")
STATE_FILE = "state.pt"
MODEL_DIR = "model"


@dataclass
class WorkerJob:
    """Everything a worker needs, as plain values (absolute paths: workers change directory)."""

    model: dict[str, Any]  # ModelConfig as a dict
    train: dict[str, Any]  # TrainConfig as a dict
    shards_dir: str
    batch_size: int  # the global batch, cut into batch_parts equal parts
    batch_parts: int  # each rank computes whole parts (rank_parts)
    loader_workers: int
    precision: str
    tracking_uri: str | None
    mlflow_run_id: str | None
    on_corrupt: str = "raise"
    shuffle_buffer: int = 1000
    progress: bool = True


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _all_finite(losses: torch.Tensor) -> bool:
    """True only if every part's loss is finite on every rank (one scalar all-reduce a step)."""
    bad = (~torch.isfinite(losses)).any().to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def _gather_node_ids() -> list[str]:
    """The Ray node id of every rank, in rank order (a collective: every rank calls it once)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        node_ids: list[str] = [""] * dist.get_world_size()
        dist.all_gather_object(node_ids, node_id)
        return node_ids
    return [node_id]


EPOCH_METRICS = ("train_loss", "val_neg_elbo", "kl_weight", "skipped_shards", "train_samples_per_s")


def log_epochs(client, run_id: str, records: list[dict]) -> None:
    """Per-epoch metrics to MLflow, the epoch as the step (the worker and the driver's back-fill)."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    metrics = [
        Metric(k, float(rec.get(k, 0)), ts, int(rec["epoch"]))
        for rec in records
        for k in EPOCH_METRICS
    ]
    client.log_batch(run_id, metrics=metrics)  # MLflow's client cuts it to the server's limits


def load_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.pt: tensors and plain values only (weights_only), so a tampered
    checkpoint can never run code; anything else is refused in one line."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise PipelineError(
            f"checkpoint {path} is not a plain tensor checkpoint ({why}); it was not loaded. "
            "Delete that checkpoint folder or train under a new cluster.run_name"
        ) from exc


def _restore(checkpoint, model, optimizer, fresh: TrainingState) -> tuple[TrainingState, list]:
    """Latest checkpoint -> model, optimizer and RNG restored; (training state, history so far).
    No checkpoint: (fresh, [])."""
    if checkpoint is None:
        return fresh, []
    with checkpoint.as_directory() as d:
        saved = load_state(Path(d) / STATE_FILE)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    torch.random.set_rng_state(saved["rng"])
    state = TrainingState.from_dict(saved["training"], fresh.cfg, fresh.beta)
    return state, list(saved["history"])


def _step_runtime(precision: str, device: torch.device, ddp_model) -> StepRuntime:
    """Mixed precision on CUDA only; the finiteness check agrees across ranks; a rank's parts
    but the last only accumulate gradients (DDP all-reduces once a step)."""
    no_sync = getattr(ddp_model, "no_sync", contextlib.nullcontext)
    if device.type != "cuda" or precision == "fp32":
        return StepRuntime(all_finite=_all_finite, no_sync=no_sync)
    if precision == "bf16":
        return StepRuntime(torch.bfloat16, all_finite=_all_finite, no_sync=no_sync)
    return StepRuntime(torch.float16, torch.amp.GradScaler("cuda"), _all_finite, no_sync)


@dataclass
class _Worker:
    """This rank's part of the run: its job, place, model and optimiser."""

    job: WorkerJob
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    ddp_model: torch.nn.Module  # DDP-wrapped when world > 1: used for training
    model: torch.nn.Module  # the unwrapped module: validation and checkpoints
    optimizer: torch.optim.Optimizer
    runtime: StepRuntime

    @property
    def parts(self) -> range:
        return rank_parts(self.job.batch_parts, self.world, self.rank)

    @cached_property
    def manifest(self):
        """Read once a run, not twice an epoch: every epoch goes by the run's first manifest."""
        return read_manifest(location(self.job.shards_dir))

    def loaders(self, split: str, epoch: int = 0) -> list[ShardLoader]:
        """One loader per part of this rank, each reading its part's shards as a rank of a
        batch_parts-wide world would: the parts, not the workers, decide what is read."""
        train, parts, manifest = split == "train", self.job.batch_parts, self.manifest
        size = part_size(self.job.batch_size, parts)
        return [
            ShardLoader(self.job.shards_dir, split, size, LoaderOptions(
                rank=part, world_size=parts, num_workers=self.job.loader_workers, epoch=epoch,
                seed=self.cfg.seed, shuffle=train, on_corrupt=self.job.on_corrupt,
                shuffle_buffer=self.job.shuffle_buffer, equalize=train,
            ), manifest)
            for part in self.parts
        ]  # fmt: skip


def _steps(w: _Worker, loaders: list[ShardLoader], epoch: int) -> Iterator[list[MicroBatch]]:
    """This rank's parts of each global batch, in part order, with their loss weight and noise."""
    weight = part_weight(w.job.batch_parts, w.world)
    for batches in zip(*loaders, strict=True):
        yield [
            MicroBatch(
                b["x"].to(w.device, non_blocking=True),
                weight,
                train_noise_seeds(b["key"], w.cfg.seed, epoch),
            )  # fmt: skip
            for b in batches
        ]


def _validate(w: _Worker) -> tuple[float, int, int]:
    """The validation -ELBO summed over the split, its example count and skipped shards. Each
    part's sum is all-reduced in a slot of its own and the slots are added in part order, so
    the total is the same to the bit however the parts are spread over ranks."""
    slots = [0.0] * (2 * w.job.batch_parts)
    skipped = 0
    # On the unwrapped module: DDP's forward would broadcast buffers, a collective that hangs
    # if ranks see different numbers of validation batches.
    for part, loader in zip(w.parts, w.loaders("val"), strict=True):
        batches = (
            MicroBatch(b["x"].to(w.device), noise_seeds=val_noise_seeds(b["key"], w.cfg.seed))
            for b in loader
        )
        slots[2 * part], slots[2 * part + 1] = validate(w.model, batches)
        skipped += len(loader.skipped)
    slots = _all_sum(slots, w.device)
    return sum(slots[0::2]), int(sum(slots[1::2])), skipped


def _run_epoch(w: _Worker, epoch: int, kl_weight: float) -> tuple[EpochRecord, dict[str, Any]]:
    """Train and validate on this rank's parts -> the epoch's record, averaged across ranks,
    and its extras (corrupt shards skipped, training throughput)."""
    started = time.perf_counter()
    loaders = w.loaders("train", epoch)
    mean, count = train_one_epoch(
        w.ddp_model, w.optimizer, _steps(w, loaders, epoch), epoch, kl_weight, w.cfg, w.runtime
    )
    train_seconds = time.perf_counter() - started
    val_sum, val_n, val_skipped = _validate(w)
    skipped = sum(len(loader.skipped) for loader in loaders) + val_skipped
    train_sum, n, skipped = _all_sum([mean * count, count, skipped], w.device)
    record = EpochRecord(epoch, train_sum / n, val_sum / val_n, kl_weight)
    # Throughput of the training pass only (validation excluded), all ranks together.
    return record, {"skipped_shards": int(skipped), "train_samples_per_s": n / train_seconds}


def _epoch_metrics(record: EpochRecord, state: TrainingState, skipped: int) -> dict[str, Any]:
    """What every rank reports to Ray for one epoch."""
    return {
        "epoch": record.epoch,
        "train_loss": record.train_loss,
        "val_neg_elbo": record.val_neg_elbo,
        "kl_weight": record.kl_weight,
        # What checkpoints are ranked by: warm-up epochs optimise another objective.
        "score": record.val_neg_elbo if state.past_warmup(record.epoch) else 1e30,
        "early_stopped": state.should_stop,
        # Corrupt shards skipped this epoch (data.on_corrupt: skip); never silent.
        "skipped_shards": skipped,
    }


def _start(job: WorkerJob) -> tuple[_Worker, TrainingState, list[dict]]:
    """Build (or restore from Ray's latest checkpoint) this rank's model, optimiser and state."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    cfg = TrainConfig(**job.train)
    mcfg = ModelConfig.from_dict(job.model)
    model = build_model(mcfg, seed=cfg.seed)
    optimizer = make_optimizer(model, cfg)
    fresh = TrainingState(cfg, beta=mcfg.beta)
    state, history = _restore(ray.train.get_checkpoint(), model, optimizer, fresh)
    # prepare_model wraps in DDP (gloo on CPU, nccl on GPU) when world > 1 and moves to device.
    ddp_model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    worker = _Worker(
        job, cfg, rank, world, device, ddp_model,
        ddp_model.module if hasattr(ddp_model, "module") else ddp_model, optimizer,
        _step_runtime(job.precision, device, ddp_model),
    )  # fmt: skip
    return worker, state, history


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker: the `vae` epoch loop on this rank's shards, checkpointed and
    reported each epoch. Returns rank 0's summary (or a NaN loss's error) to the driver."""
    w, state, history = _start(WorkerJob(**config))
    logger = _RankZeroLogger(w.job, history) if w.rank == 0 else None
    node_ids = _gather_node_ids()  # where the ranks run; Ray returns rank 0's value to the driver
    outcome = {"fatal_error": None, "node_ids": node_ids, "start_epoch": state.epoch}
    try:
        for epoch in state.remaining_epochs():
            try:
                record, extras = _run_epoch(w, epoch, state.kl_weight(epoch))
            except NonFiniteLossError as exc:
                # Every rank got here at the same step. A restart would hit the same NaN, so
                # return the error as the run's result instead of failing into Ray's retries.
                outcome["fatal_error"] = str(exc)
                break
            improved = state.update(record.val_neg_elbo)
            history.append(asdict(record) | {"improved": improved} | extras)
            metrics = _epoch_metrics(record, state, extras["skipped_shards"])
            _report(w, metrics, state, history)
            if logger is not None:
                logger.log_epoch(history[-1], w.cfg.epochs)
    finally:
        if logger is not None:  # a failed epoch too: the driver, not this process, ends the run
            logger.close()
    return outcome


def _report(w: _Worker, metrics: dict, state: TrainingState, history: list[dict]) -> None:
    """Checkpoint from rank 0 only; every rank reports (report() is a barrier)."""
    import ray.train

    if w.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    epoch = metrics["epoch"]
    with tempfile.TemporaryDirectory() as tmp:
        saved = {
            "model": w.model.state_dict(),
            "optimizer": w.optimizer.state_dict(),
            "epoch": epoch,
            "rng": torch.random.get_rng_state(),
            "training": state.to_dict(),
            "history": history,
        }
        _save_state(saved, Path(tmp) / STATE_FILE)
        save_model(w.model, Path(tmp) / MODEL_DIR, extra={"epoch": epoch})
        (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_epoch_{epoch:05d}",
        )


def _save_state(state: dict[str, Any], path: Path) -> None:
    """torch.save, with a full disk reported as one (torch says RuntimeError for it)."""
    try:
        torch.save(state, path)
    except (OSError, RuntimeError) as exc:
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise StorageError(
            getattr(exc, "errno", None) or errno.EIO,
            f"cannot write checkpoint {path} ({why}); free space there and re-run: the run "
            "resumes from its latest complete checkpoint",
        ) from exc


class _RankZeroLogger:
    """Per-epoch metrics to MLflow (and a progress line), from rank 0 only.

    Every epoch appears in MLflow exactly once. After a restart Ray resumes from the latest
    checkpoint it had registered, which can be older than the last epoch already logged; such
    epochs are re-run (with the same seeds, so the same numbers) but not logged again. Epochs
    a checkpoint holds but MLflow lacks (a crash between the two) are back-filled.
    """

    def __init__(self, job: WorkerJob, history: list[dict]) -> None:
        self.job = job
        self.client = None
        self.monitor = None  # MLflow's system-metrics sampler, logging into the driver's run
        self.logged: set[int] = set()
        if job.tracking_uri and job.mlflow_run_id:
            import mlflow

            # The other ranks wait for rank 0 at the next collective: a tracking server that
            # went away must cost seconds, not MLflow's default minutes of retries. The user's
            # own settings win.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
            self.client = mlflow.MlflowClient(job.tracking_uri)
            self.monitor = _start_system_metrics(self.client, job.mlflow_run_id)
            try:
                history_so_far = self.client.get_metric_history(job.mlflow_run_id, "val_neg_elbo")
            except Exception as exc:  # noqa: BLE001 - see _give_up
                self._give_up(exc)
            else:
                self.logged = {m.step for m in history_so_far}
            for rec in history:
                self._log(rec)

    def _give_up(self, exc: Exception) -> None:
        """MLflow stopped answering: train on without it. The driver logs the epochs MLflow
        lacks when the run ends, or says to re-run once the server is back."""
        log.warning(
            "MLflow at %s stopped answering (%s); training goes on and the missing epochs are "
            "logged when the run ends or is resumed",
            self.job.tracking_uri,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        self.client = None
        self._detach()

    def _detach(self) -> None:
        """Stop the system metrics, leaving the run's status alone: the driver ends the run once
        the best model is exported, or marks it KILLED/FAILED when training stops. The monitor
        also stops by itself when it cannot reach MLflow, so a server that is gone costs one
        failed call here."""
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()

    def _log(self, rec: dict) -> None:
        if self.client is None or int(rec["epoch"]) in self.logged:
            return
        try:
            log_epochs(self.client, self.job.mlflow_run_id, [rec])
        except Exception as exc:  # noqa: BLE001 - see _give_up
            self._give_up(exc)
            return
        self.logged.add(int(rec["epoch"]))

    def log_epoch(self, rec: dict, total: int) -> None:
        self._log(rec)
        if self.job.progress:
            mark = " *" if rec.get("improved") else ""
            if rec.get("skipped_shards"):
                mark += f"  ({rec['skipped_shards']} corrupt shard(s) skipped)"
            print(
                f"epoch {rec['epoch'] + 1}/{total}  train {rec['train_loss']:.3f}  "
                f"val -ELBO {rec['val_neg_elbo']:.3f} nats/example{mark}",
                flush=True,
            )

    def close(self) -> None:
        self._detach()


def _start_system_metrics(client, run_id: str):
    """System metrics (CPU, memory, disk, network, GPU) of rank 0's node into the driver's run,
    sampled every 2 s unless MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says otherwise. MLflow's
    own monitor, started on the run directly rather than through `mlflow.start_run(...,
    log_system_metrics=True)`: ending a fluent run always writes a status, and a worker torn
    down after an interrupt would write RUNNING over the driver's KILLED. A nicety: None, and
    training goes on, when the run is gone or MLflow cannot start the monitor."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    try:
        if client.get_run(run_id).info.lifecycle_stage != "active":
            return None
        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=2, resume_logging=True, tracking_uri=client.tracking_uri
        )
        monitor.start()
    except Exception:  # noqa: BLE001 - see above
        return None
    return monitor
