"""The loop each Ray Train worker runs. It reuses the `vae` library's epoch and validation steps;
this layer only shards data, wraps the model for DDP, averages metrics across ranks,
checkpoints and reports.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipelines.data.loader import make_loader
from pipelines.errors import PipelineError
from vae import (
    ModelConfig,
    NonFiniteLossError,
    StorageError,
    build_model,
    save_model,
    train_one_epoch,
    validate,
)
from vae.train import EarlyStopping, EpochRecord, TrainConfig, kl_weight_for_epoch, make_optimizer

log = logging.getLogger("vae_pipeline.train")
STATE_FILE = "state.pt"
MODEL_DIR = "model"


@dataclass
class WorkerJob:
    """Everything a worker needs, as plain values (absolute paths: workers change directory)."""

    model: dict[str, Any]  # ModelConfig as a dict
    train: dict[str, Any]  # TrainConfig as a dict
    shards_dir: str
    batch_size: int
    loader_workers: int
    precision: str
    tracking_uri: str | None
    mlflow_run_id: str | None
    on_corrupt: str = "raise"
    shuffle_buffer: int = 1000
    progress: bool = True


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """A fresh, reproducible seed per (rank, epoch): resuming mid-run replays the same noise."""
    return (seed * 1_000_003 + rank * 10_007 + epoch) % (2**31)


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _all_finite(loss: torch.Tensor) -> bool:
    """True only if the loss is finite on every rank (one scalar all-reduce per step)."""
    bad = (~torch.isfinite(loss)).to(torch.float32).reshape(1)
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
    for start in range(0, len(metrics), 1000):  # MLflow's log_batch limit
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


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
            "Delete that checkpoint folder or train under a new train.run_name"
        ) from exc


def _restore(checkpoint, model, optimizer) -> tuple[int, list[dict], EarlyStopping | None]:
    """Latest checkpoint -> (next epoch, history so far, early-stopping state)."""
    if checkpoint is None:
        return 0, [], None
    with checkpoint.as_directory() as d:
        state = load_state(Path(d) / STATE_FILE)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.random.set_rng_state(state["rng"])
    stopper = EarlyStopping(None)
    stopper.__dict__.update(state["stopper"])
    return int(state["epoch"]) + 1, list(state["history"]), stopper


def _autocast(precision: str, device: torch.device):
    if device.type != "cuda" or precision == "fp32":
        return None, None
    if precision == "bf16":
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    import ray.train.torch

    job = WorkerJob(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    mcfg = ModelConfig.from_dict(job.model)
    tcfg = TrainConfig(**job.train)

    model = build_model(mcfg, seed=tcfg.seed)
    optimizer = make_optimizer(model, tcfg)
    start_epoch, history, stopper = _restore(ray.train.get_checkpoint(), model, optimizer)
    stopper = stopper or EarlyStopping(tcfg.early_stopping_patience, tcfg.min_delta)
    # prepare_model wraps in DDP (gloo on CPU, nccl on GPU) when world > 1 and moves to device.
    ddp_model = ray.train.torch.prepare_model(model)
    base = ddp_model.module if hasattr(ddp_model, "module") else ddp_model
    amp_dtype, scaler = _autocast(job.precision, device)
    logger = _RankZeroLogger(job, history) if rank == 0 else None
    node_ids = _gather_node_ids()  # where the ranks run; Ray returns rank 0's value to the driver

    for epoch in range(start_epoch, tcfg.epochs):
        if stopper.should_stop:
            break
        torch.manual_seed(epoch_seed(tcfg.seed, rank, epoch))
        started = time.perf_counter()
        w = kl_weight_for_epoch(epoch, mcfg.beta, tcfg.kl_warmup_epochs)
        loader = make_loader(
            job.shards_dir, "train", job.batch_size, rank=rank, world_size=world,
            num_workers=job.loader_workers, epoch=epoch, seed=tcfg.seed, shuffle=True,
            on_corrupt=job.on_corrupt, shuffle_buffer=job.shuffle_buffer,
        )  # fmt: skip
        batches = (b["x"].to(device, non_blocking=True) for b in loader)
        try:
            mean, count = train_one_epoch(
                ddp_model, optimizer, batches, epoch, w, tcfg.grad_clip_norm, amp_dtype, scaler,
                all_finite=_all_finite,
            )  # fmt: skip
        except NonFiniteLossError as exc:
            # Every rank got here at the same step. A restart would hit the same NaN, so
            # return the error as the run's result instead of failing into Ray's retries.
            if logger is not None:
                logger.close()
            return {"fatal_error": str(exc), "node_ids": node_ids, "start_epoch": start_epoch}
        # Validation on the unwrapped module: DDP's forward would broadcast buffers, a
        # collective that hangs if ranks see different numbers of validation batches.
        val_loader = make_loader(
            job.shards_dir, "val", job.batch_size, rank=rank, world_size=world,
            num_workers=job.loader_workers, shuffle=False, equalize=False,
            on_corrupt=job.on_corrupt,
        )  # fmt: skip
        val_total, val_n = validate(base, (b["x"].to(device) for b in val_loader))
        train_seconds = time.perf_counter() - started
        skipped = len(loader.skipped) + len(val_loader.skipped)
        train_sum, n, val_sum, vn, skipped = _all_sum(
            [mean * count, count, val_total, val_n, skipped], device
        )
        record = EpochRecord(epoch, train_sum / n, val_sum / vn, w)
        past_warmup = w == mcfg.beta
        improved = past_warmup and stopper.improved(record.val_neg_elbo)
        history.append(
            asdict(record)
            | {
                "improved": improved,
                "skipped_shards": int(skipped),
                # Training pass only (validation excluded), all ranks together.
                "train_samples_per_s": n / train_seconds,
            }
        )
        metrics = {
            "epoch": epoch,
            "train_loss": record.train_loss,
            "val_neg_elbo": record.val_neg_elbo,
            "kl_weight": w,
            # What checkpoints are ranked by: warm-up epochs optimise another objective.
            "score": record.val_neg_elbo if past_warmup else 1e30,
            "early_stopped": stopper.should_stop,
            # Corrupt shards skipped this epoch (data.on_corrupt: skip); never silent.
            "skipped_shards": int(skipped),
        }
        _report(metrics, rank, epoch, base, optimizer, stopper, history)
        if logger is not None:
            logger.log_epoch(history[-1], tcfg.epochs)
    if logger is not None:
        logger.close()
    return {"fatal_error": None, "node_ids": node_ids, "start_epoch": start_epoch}


def _report(metrics, rank, epoch, model, optimizer, stopper, history) -> None:
    """Checkpoint from rank 0 only; every rank reports (report() is a barrier)."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "rng": torch.random.get_rng_state(),
            "stopper": dict(stopper.__dict__),
            "history": history,
        }
        _save_state(state, Path(tmp) / STATE_FILE)
        save_model(model, Path(tmp) / MODEL_DIR, extra={"epoch": epoch})
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
        self.monitor = None
        self.logged: set[int] = set()
        if job.tracking_uri and job.mlflow_run_id:
            import mlflow
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # The other ranks wait for rank 0 at the next collective: a tracking server that
            # went away must cost seconds, not MLflow's default minutes of retries. The user's
            # own settings win.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
            self.client = mlflow.MlflowClient(job.tracking_uri)
            mlflow.set_tracking_uri(job.tracking_uri)  # the system-metrics monitor logs globally
            try:
                self.monitor = SystemMetricsMonitor(
                    job.mlflow_run_id, sampling_interval=2, samples_before_logging=1
                )
                self.monitor.start()
            except Exception:  # system metrics are a nicety; never fail training on them
                self.monitor = None
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
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None

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
        if self.monitor is not None:
            self.monitor.finish()
