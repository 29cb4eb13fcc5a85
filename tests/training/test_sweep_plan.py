"""The sweep's plan, decided before Ray starts: --grid and --sample read into trials, the time
budget, the trials that fit the cluster side by side, and the best trial (no Ray here)."""

from __future__ import annotations

import pytest

from pipelines.errors import ParamsError
from pipelines.training.sweep_plan import (
    SweepSpec,
    TrialOutcome,
    best_trial,
    concurrent_trials,
    parse_duration,
    split_values,
)


def test_values_split_on_commas_outside_brackets_and_quotes():
    assert split_values("1,4,8") == ["1", "4", "8"]
    assert split_values("[64],[128,64]") == ["[64]", "[128,64]"]
    assert split_values("'a,b', c") == ["'a,b'", "c"]


def test_a_grid_plans_every_combination_in_order():
    spec = SweepSpec.from_flags(["model.beta=1,4,8", "model.latent_dim=8,16"], [], None)
    plans = spec.plan(seed=0)
    assert spec.trials == 6 and len(plans) == 6
    assert plans[0] == ["model.beta=1", "model.latent_dim=8"]
    assert plans[-1] == ["model.beta=8", "model.latent_dim=16"]
    assert len({tuple(p) for p in plans}) == 6


def test_a_grid_larger_than_the_trial_budget_is_refused():
    with pytest.raises(ParamsError, match="--grid gives 6 combinations, more than --trials 4"):
        SweepSpec.from_flags(["model.beta=1,4,8", "model.latent_dim=8,16"], [], 4)


def test_random_picks_are_seeded_distinct_and_share_the_budget_between_grid_points():
    spec = SweepSpec.from_flags(
        ["model.beta=1,4"], ["train.lr=0.1,0.01,0.001", "model.latent_dim=2,3"], 6
    )
    plans = spec.plan(seed=7)
    assert plans == spec.plan(seed=7)  # the same command plans the same trials
    assert len(plans) == 6  # 2 grid points x 3 picks each
    for beta in ("model.beta=1", "model.beta=4"):
        picks = [tuple(p[1:]) for p in plans if p[0] == beta]
        assert len(picks) == 3 and len(set(picks)) == 3  # never the same combination twice
    assert spec.plan(seed=8) != plans


def test_random_picks_stop_at_the_number_of_distinct_combinations():
    spec = SweepSpec.from_flags([], ["model.beta=1,2"], None)
    assert spec.trials == 10 and sorted(map(tuple, spec.plan(seed=0))) == [
        ("model.beta=1",), ("model.beta=2",)
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("grid", "sample", "trials", "message"),
    [
        ([], [], None, "nothing to sweep"),
        (["data.val_fraction=0.1,0.2"], [], None, "varies model.* and train.*"),
        (["cluster.num_workers=1,2"], [], None, "varies model.* and train.*"),
        (["model"], [], None, "must look like section.key=value1,value2"),
        (["model.beta=1,,2"], [], None, "empty value"),
        (["model.beta=1,1"], [], None, "lists a value twice"),
        (["model.beta=1,2"], ["model.beta=3,4"], None, "model.beta is swept twice"),
        (["model.beta=1,2"], [], 0, "give 1 to 1000 trials"),
    ],
)
def test_a_bad_sweep_flag_is_one_line_naming_it(grid, sample, trials, message):
    with pytest.raises(ParamsError, match=message) as info:
        SweepSpec.from_flags(grid, sample, trials)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("1.5h", 5400), ("1d", 86400)]
)
def test_a_time_budget_reads_seconds_or_a_unit(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "-5", "ten", "5 weeks", ""])
def test_a_time_budget_that_is_no_duration_is_refused(text):
    with pytest.raises(ParamsError, match="--time-budget"):
        parse_duration(text)


def test_trials_side_by_side_are_what_the_cluster_fits_at_least_one():
    assert concurrent_trials(8, cpus=2, gpus=0, workers=1, cpus_per_worker=1, use_gpu=False) == 2
    assert concurrent_trials(8, cpus=16, gpus=0, workers=2, cpus_per_worker=2, use_gpu=False) == 4
    assert concurrent_trials(3, cpus=64, gpus=0, workers=1, cpus_per_worker=1, use_gpu=False) == 3
    assert concurrent_trials(8, cpus=64, gpus=2, workers=1, cpus_per_worker=1, use_gpu=True) == 2
    assert concurrent_trials(8, cpus=1, gpus=0, workers=2, cpus_per_worker=1, use_gpu=False) == 1


def _outcome(index: int, status: str, val: float | None) -> TrialOutcome:
    return TrialOutcome(index, (f"model.beta={index}",), status, f"run-{index}", f"id-{index}", val)


def test_the_best_trial_is_the_finished_one_with_the_lowest_validation_neg_elbo():
    outcomes = [
        _outcome(0, "finished", 120.0),
        _outcome(1, "finished", 95.5),
        _outcome(2, "stopped", 10.0),  # cut off by the time budget: not a candidate
        _outcome(3, "failed", None),
        _outcome(4, "finished", float("nan")),
        _outcome(5, "finished", 95.5),  # a tie: the first planned wins
    ]
    assert best_trial(outcomes).index == 1
    assert best_trial([_outcome(0, "failed", None), _outcome(1, "not started", None)]) is None
