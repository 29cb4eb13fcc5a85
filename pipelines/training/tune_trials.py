"""A sweep's trials on Ray Tune: each trial is one `train` run (train_model: the same checks,
MLflow run, Ray Train workers and export), started by a Tune function trainable, which Ray
Train v2 documents for sweeps; Tune places the trials on the cluster, runs as many side by side
as fit, and stops them at the time budget.

The trials are planned before Ray starts (pipelines/training/sweep_plan.py), so Tune's search
space is simply the trials' numbers: every trial's params were checked on the driver.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipelines.cluster import task_error_line, verbose
from pipelines.training.driver import train_model
from pipelines.training.job import TrainJob
from pipelines.training.sweep_plan import TrialOutcome

# The trial's own process only waits for its Train run (as `train`'s driver does), and Ray
# Train's controller takes no CPU: the trial holds a token of memory, not a CPU, so its CPUs all
# go to its workers. Tune needs some resource in the request; memory is on every node.
TRIAL_MEMORY_BYTES = 64 * 2**20
FINISHED_KEY = "sweep_trial_finished"  # in a trial's last result only when train_model returned


@dataclass(frozen=True)
class TrialsJob:
    """The trials to run: each one's train job (in its own outputs folder, tagged with the
    sweep's parent run), their overrides and run names, and how Tune runs them."""

    trials: tuple[TrainJob, ...]
    overrides: tuple[tuple[str, ...], ...]
    run_names: tuple[str, ...]
    storage: Path  # cluster.storage_path: Tune's experiment folder and the trials' checkpoints
    name: str  # the sweep's name: Tune's experiment folder under storage
    concurrent: int
    time_budget_s: float | None


def _trial(config: dict[str, Any], jobs: list[TrainJob]) -> dict[str, Any]:
    """One Tune trial: train_model with the trial's job; what it returns is the trial's last
    result (its objective: the exported model's validation -ELBO)."""
    result = train_model(jobs[config["trial"]], progress=False)
    return {
        FINISHED_KEY: True,
        "val_neg_elbo": result.best_val_neg_elbo,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "mlflow_run_id": result.mlflow_run_id,
    }


def run_trials(job: TrialsJob, progress: bool = True) -> list[TrialOutcome]:
    """Run the trials on Ray Tune (Ray already started) -> one outcome per planned trial."""
    from ray import tune

    # Ctrl-C: a KeyboardInterrupt for the CLI to close the MLflow runs and print its line. Tune's
    # own handler would instead end the sweep quietly and return as if it had finished.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    # Tune's console output (its new engine prints a table at verbose=0 too) and its result
    # files in CSV, JSON and TensorBoard form: the bar, MLflow and the result say it all.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    jobs = [replace(t, report_to_tune=True) for t in job.trials]
    trainable = tune.with_resources(
        tune.with_parameters(_trial, jobs=jobs), {"cpu": 0, "memory": TRIAL_MEMORY_BYTES}
    )
    bar = _progress_callback(len(jobs), progress)
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(list(range(len(jobs))))},
        tune_config=tune.TuneConfig(
            metric="val_neg_elbo", mode="min", max_concurrent_trials=job.concurrent,
            time_budget_s=job.time_budget_s,
            reuse_actors=True,  # the next trial skips starting a process (torch's import)
        ),
        run_config=tune.RunConfig(
            name=job.name, storage_path=str(job.storage), verbose=0, callbacks=[bar],
        ),
    )  # fmt: skip
    try:
        with _tune_logs_quiet():
            grid = tuner.fit()
    finally:
        bar.close()
    seen = {r.config["trial"]: r for r in grid if r.config and "trial" in r.config}
    return [_outcome(i, job, seen.get(i)) for i in range(len(jobs))]


def _outcome(index: int, job: TrialsJob, result) -> TrialOutcome:
    """What became of one trial: finished (its objective), failed (its error in one line),
    stopped by the time budget or an interrupt, or never started."""
    name, overrides = job.run_names[index], job.overrides[index]
    run_id = _run_id_of(job.storage / name)
    if result is None:
        return TrialOutcome(index, overrides, "not started", name, run_id)
    metrics = result.metrics or {}
    if metrics.get(FINISHED_KEY):
        return TrialOutcome(
            index, overrides, "finished", name, metrics["mlflow_run_id"],
            float(metrics["val_neg_elbo"]), int(metrics["best_epoch"]), int(metrics["epochs_run"]),
        )  # fmt: skip
    if result.error is not None:
        line = task_error_line(result.error)
        why = str(line) if line else (str(result.error).strip().splitlines() or ["?"])[-1]
        return TrialOutcome(index, overrides, "failed", name, run_id, error=why[:300])
    return TrialOutcome(index, overrides, "stopped", name, run_id)


def _run_id_of(run_dir: Path) -> str | None:
    """The trial's MLflow run, as train_model recorded it beside the checkpoints."""
    try:
        return (run_dir / "mlflow_run_id").read_text().strip() or None
    except OSError:
        return None


@contextlib.contextmanager
def _tune_logs_quiet() -> Iterator[None]:
    """Tune's own lines (result files written, trials not completed at the time budget) stay in
    Ray's logs: the bar and the result say what a person needs. --verbose shows them."""
    logger = logging.getLogger("ray.tune")
    previous = logger.level
    if not verbose():
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _progress_callback(total: int, enabled: bool):
    """A Tune callback (it runs in this process) drawing trials done / total and the best
    validation -ELBO reported so far on stderr."""
    from ray.tune import Callback
    from tqdm.auto import tqdm

    class TrialBar(Callback):
        def __init__(self) -> None:
            self.bar = None
            if enabled:
                self.bar = tqdm(total=total, desc="sweep", unit="trial", file=sys.stderr,
                                dynamic_ncols=True)  # fmt: skip
            self.best: float | None = None
            self.failed = 0

        def __getstate__(self) -> dict:  # Tune saves its callbacks; a bar is not state
            return {"bar": None, "best": self.best, "failed": self.failed}

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            value = result.get("val_neg_elbo")
            if isinstance(value, int | float) and (self.best is None or value < self.best):
                self.best = float(value)
                self._postfix()

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._done()

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self.failed += 1
            self._done()

        def _done(self) -> None:
            if self.bar is not None:
                self.bar.update(1)
                self._postfix()

        def _postfix(self) -> None:
            if self.bar is None:
                return
            shown = {} if self.best is None else {"best val -ELBO": f"{self.best:.3f}"}
            self.bar.set_postfix(shown | ({"failed": self.failed} if self.failed else {}))

        def close(self) -> None:
            if self.bar is not None:
                self.bar.close()

    return TrialBar()
