"""What the sweep command reads (SweepJob: each trial's train job, built once at the edge from
the params file and the trial's overrides) and what it returns (SweepResult)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.errors import ParamsError
from pipelines.evaluation.evaluate import EvaluateJob
from pipelines.params_file import load_params
from pipelines.registry.register import RegisterJob
from pipelines.training.job import TrainJob
from pipelines.training.sweep_plan import SweepSpec, TrialOutcome


@dataclass(frozen=True)
class SweepJob:
    """The search, each planned trial's overrides and train job (as `train` would run it, into
    the main outputs folder: the sweep moves each trial into a folder of its own), and the
    evaluate and register jobs the best trial goes through (the same for every trial: a sweep
    varies only model.* and train.*)."""

    spec: SweepSpec
    plans: tuple[tuple[str, ...], ...]
    trials: tuple[TrainJob, ...]
    evaluate: EvaluateJob
    register: RegisterJob
    time_budget_s: float | None = None
    evaluate_all: bool = False

    @property
    def base(self) -> TrainJob:
        return self.trials[0]


def trial_jobs(
    params_file: str | None, overrides: list[str], spec: SweepSpec, plans: list[list[str]]
) -> list[TrainJob]:
    """Each trial's train job: the params file, the command's --set overrides, then the trial's
    own (which win). Every swept value is checked alone first, so a bad one is named with its
    flag; then every trial, so a combination no model can take fails before Ray starts."""
    for choice in (*spec.grid, *spec.sample):
        for value in choice.values:
            _load(params_file, overrides, [choice.override(value)], f"{choice.flag} ")
    jobs = []
    for plan in plans:
        params = _load(params_file, overrides, plan, "trial ")
        jobs.append(TrainJob.from_params(params))
    return jobs


def _load(params_file: str | None, overrides: list[str], more: list[str], flag: str):
    try:
        return load_params(params_file, [*overrides, *more])
    except ParamsError as exc:
        what = " ".join(more)
        raise ParamsError(f"{flag}{what}: {exc}".replace("; fix params.yaml or --set", "")) from exc


@dataclass
class SweepResult:
    name: str
    mlflow_run_id: str  # the parent run; each trial's is a child of it
    storage: str
    concurrent_trials: int
    time_budget_s: float | None
    search: dict[str, Any]
    trials: list[TrialOutcome]
    best: TrialOutcome
    evaluated: dict[str, Any]  # the best's evaluate result
    registered: dict[str, Any]  # the best's register result
    trained: dict[str, Any] = field(default_factory=dict)  # the best's train_result.json

    def to_dict(self) -> dict[str, Any]:
        reg = self.registered
        return {
            "metrics": self.evaluated.get("metrics"),
            "objective": "val_neg_elbo: validation -ELBO, nats per example (lower is better)",
            "best_trial": self.best.index,
            "best_overrides": " ".join(self.best.overrides),
            "best_val_neg_elbo": self.best.val_neg_elbo,
            "best_mlflow_run_id": self.best.mlflow_run_id,
            "decision": reg.get("decision"),
            "reason": reg.get("reason"),
            "encoder_uri": reg.get("encoder_uri"),
            "decoder_uri": reg.get("decoder_uri"),
            "metrics_file": self.evaluated.get("metrics_file"),
            "model_dir": self.trained.get("model_dir"),
            "name": self.name,
            "mlflow_run_id": self.mlflow_run_id,
            "storage": self.storage,
            "concurrent_trials": self.concurrent_trials,
            "time_budget_s": self.time_budget_s,
            "search": self.search,
            "trials": [t.to_dict() for t in self.trials],
            "register": reg,
        }


def trial_folder(outputs: Path, name: str, index: int) -> Path:
    """A trial's own outputs folder (its exported model, history, evaluation)."""
    return outputs / "sweep" / name / f"trial-{index:03d}"
