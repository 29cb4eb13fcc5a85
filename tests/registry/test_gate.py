"""The gate's statistics on known differences (no MLflow, no models)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.params import RegisterParams
from pipelines.registry.gate import bootstrap_mean_ci, compare


def _scores(shift: float, noise: float, n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    champion = rng.normal(50, 10, n)  # per-example spread shared by both: pairing removes it
    return champion + shift + rng.normal(0, noise, n), champion


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_data():
    rng = np.random.default_rng(1)
    small, large = rng.normal(-1, 2, 100), rng.normal(-1, 2, 10_000)
    lo_s, hi_s = bootstrap_mean_ci(small, 500, 0.95, seed=0)
    lo_l, hi_l = bootstrap_mean_ci(large, 500, 0.95, seed=0)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 5
    assert bootstrap_mean_ci(small, 500, 0.95, seed=0) == (lo_s, hi_s)  # seeded


def test_clear_improvement_beyond_the_margin_is_promoted():
    new, old = _scores(shift=-2.0, noise=1.0)
    res = compare(new, old, "3", RegisterParams(margin=1.0))
    assert res.decision == "champion" and res.ci_high < -1.0
    assert res.mean_diff == pytest.approx(-2.0, abs=0.2)


def test_improvement_inside_the_margin_is_a_challenger():
    new, old = _scores(shift=-0.5, noise=1.0)
    assert compare(new, old, "3", RegisterParams(margin=1.0)).decision == "challenger"


def test_noisy_tie_wins_on_the_mean_only_when_the_ci_is_not_required():
    new, old = _scores(shift=-0.05, noise=2.0)
    strict = compare(new, old, "3", RegisterParams(require_ci=True))
    lenient = compare(new, old, "3", RegisterParams(require_ci=False))
    assert strict.mean_diff < 0 < strict.ci_high
    assert (strict.decision, lenient.decision) == ("challenger", "champion")


def test_identical_models_never_displace_the_champion():
    _, old = _scores(shift=0, noise=0)
    res = compare(old.copy(), old, "3", RegisterParams(require_ci=False))
    assert res.decision == "challenger" and res.mean_diff == 0
