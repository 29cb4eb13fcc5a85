"""What a sweep will run, decided before Ray starts: the `--grid` and `--sample` flags read into
one list of trials (each a list of `--set` overrides), the time budget in seconds, how many
trials the cluster runs side by side, and which finished trial is the best.

Pure functions of their arguments (no Ray, no MLflow, no files), so that every trial's params
can be checked, and the sweep named, before anything starts; tests/training/test_sweep_plan.py.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass

from pipelines.errors import ParamsError

# What a sweep varies: settings of the model and of its training. The data (staged once, before
# the sweep), the cluster, the evaluation and the gate are the same for every trial.
SWEPT_SECTIONS = ("model", "train")
DEFAULT_SAMPLED_TRIALS = 10
MAX_TRIALS = 1000
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Choice:
    """One swept key and the values it takes, as written (each a YAML value, like --set's)."""

    flag: str  # --grid or --sample, for messages
    key: str
    values: tuple[str, ...]

    def override(self, value: str) -> str:
        return f"{self.key}={value}"


def split_values(text: str) -> list[str]:
    """`1,4,8` -> ['1', '4', '8']; commas inside brackets or quotes belong to one value, so a
    list setting reads `[64],[128,64]`."""
    values, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    values.append(text[start:].strip())
    return values


def parse_choice(flag: str, text: str) -> Choice:
    """`--grid model.beta=1,4,8` -> Choice('--grid', 'model.beta', ('1', '4', '8'))."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ParamsError(f"{flag} {text!r} must look like section.key=value1,value2")
    if key.split(".")[0] not in SWEPT_SECTIONS or "." not in key:
        raise ParamsError(
            f"{flag} {text!r}: a sweep varies model.* and train.* settings (the data, cluster, "
            "evaluation and gate are the sweep's own); give the others with --set"
        )
    values = split_values(raw)
    if any(not v for v in values):
        raise ParamsError(f"{flag} {text!r} has an empty value; separate values with one comma")
    if len(set(values)) != len(values):
        raise ParamsError(f"{flag} {text!r} lists a value twice; list each value once")
    return Choice(flag, key, tuple(values))


def parse_duration(text: str) -> float:
    """`90`, `90s`, `30m`, `2h`, `1d` -> seconds (> 0)."""
    found = _DURATION.match(text)
    seconds = float(found[1]) * _UNIT_S[found[2]] if found else 0.0
    if seconds <= 0:
        raise ParamsError(
            f"--time-budget {text!r} is not a duration; give seconds or a number with s, m, h "
            "or d, e.g. 90, 30m or 2h"
        )
    return seconds


@dataclass(frozen=True)
class SweepSpec:
    """The search: every combination of the --grid values, each with `draws` distinct random
    picks of the --sample values; at most `trials` trials in all."""

    grid: tuple[Choice, ...]
    sample: tuple[Choice, ...]
    trials: int

    @classmethod
    def from_flags(cls, grid: list[str], sample: list[str], trials: int | None) -> SweepSpec:
        choices = [parse_choice("--grid", g) for g in grid]
        drawn = [parse_choice("--sample", s) for s in sample]
        keys = [c.key for c in (*choices, *drawn)]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ParamsError(f"{twice[0]} is swept twice; give each key one --grid or --sample")
        if not keys:
            raise ParamsError(
                "nothing to sweep; give --grid section.key=v1,v2 (every value) or --sample "
                "section.key=v1,v2 (random picks), e.g. --grid model.beta=1,4,8"
            )
        points = math.prod(len(c.values) for c in choices)
        budget = trials if trials is not None else (DEFAULT_SAMPLED_TRIALS if drawn else points)
        if not 1 <= budget <= MAX_TRIALS:
            raise ParamsError(f"--trials {budget}: give 1 to {MAX_TRIALS} trials")
        if points > budget:
            raise ParamsError(
                f"--grid gives {points} combinations, more than --trials {budget}; raise "
                "--trials or list fewer values (or move a key to --sample for random picks)"
            )
        return cls(tuple(choices), tuple(drawn), budget)

    @property
    def grid_points(self) -> int:
        return math.prod(len(c.values) for c in self.grid)

    def plan(self, seed: int) -> list[list[str]]:
        """Each trial's overrides, grid keys first. Random picks are seeded (train.seed), so the
        same command plans the same trials; within a grid point they never repeat."""
        grid_values = [[c.override(v) for v in c.values] for c in self.grid]
        points = [list(p) for p in itertools.product(*grid_values)]
        if not self.sample:
            return points
        space = [list(p) for p in itertools.product(*[[c.override(v) for v in c.values]
                                                     for c in self.sample])]  # fmt: skip
        draws = min(self.trials // len(points), len(space))
        rng = random.Random(seed)
        return [[*point, *picked] for point in points for picked in rng.sample(space, draws)]

    def describe(self) -> dict[str, object]:
        """The search as the result and the parent MLflow run record it."""
        return {
            "grid": {c.key: list(c.values) for c in self.grid},
            "sample": {c.key: list(c.values) for c in self.sample},
            "trials": self.trials,
        }


def concurrent_trials(
    trials: int, cpus: float, gpus: float, workers: int, cpus_per_worker: float, use_gpu: bool
) -> int:
    """Trials the cluster runs side by side: each holds its own Train workers' CPUs (and GPUs);
    its driver and Ray Train's controller take none. At least 1, at most `trials`."""
    fit = int(cpus / (workers * cpus_per_worker) + 1e-9)
    if use_gpu:
        fit = min(fit, int(gpus / workers + 1e-9))
    return max(1, min(trials, fit))


@dataclass(frozen=True)
class TrialOutcome:
    """One trial as the sweep saw it end: finished with its best validation -ELBO, or not."""

    index: int
    overrides: tuple[str, ...]
    status: str  # finished | failed | stopped (time budget) | not started
    run_name: str
    mlflow_run_id: str | None = None
    val_neg_elbo: float | None = None  # the objective: the exported model's validation -ELBO
    best_epoch: int | None = None
    epochs_run: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v is not None} | {
            "overrides": list(self.overrides)
        }


def best_trial(outcomes: list[TrialOutcome]) -> TrialOutcome | None:
    """The finished trial with the lowest validation -ELBO (nats per example); the first
    planned among equals. None when no trial finished."""
    finished = [o for o in outcomes if o.status == "finished" and o.val_neg_elbo is not None]
    finished = [o for o in finished if math.isfinite(o.val_neg_elbo)]
    return min(finished, key=lambda o: (o.val_neg_elbo, o.index), default=None)
