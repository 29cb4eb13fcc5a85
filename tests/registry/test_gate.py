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


def _reference_ci(diff, samples: int, confidence: float, seed: int):
    """The percentile bootstrap written plainly: all resamples at once, no chunking."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return tuple(float(q) for q in np.quantile(means, [alpha, 1 - alpha]))


@pytest.mark.parametrize("budget", [1 << 23, 64, 7])  # one chunk; many chunks; a row per chunk
def test_chunked_bootstrap_equals_the_plain_percentile_bootstrap(budget, monkeypatch):
    from pipelines.registry import gate

    monkeypatch.setattr(gate, "_BOOTSTRAP_BUDGET", budget)
    diff = np.random.default_rng(3).normal(-0.3, 1.5, 25)
    for confidence in (0.5, 0.9, 0.99):
        got = bootstrap_mean_ci(diff, 40, confidence, seed=11)
        assert got == pytest.approx(_reference_ci(diff, 40, confidence, 11), abs=1e-12)


def test_bootstrap_interval_has_the_normal_width_for_its_confidence():
    diff = np.random.default_rng(4).normal(0.0, 1.0, 2000)
    se = diff.std() / np.sqrt(len(diff))
    for confidence, z in ((0.95, 1.960), (0.8, 1.2816)):
        low, high = bootstrap_mean_ci(diff, 4000, confidence, seed=0)
        assert (high - low) / 2 == pytest.approx(z * se, rel=0.05)


def test_compare_reports_every_number_and_says_how_it_decided():
    new, old = _scores(shift=-2.0, noise=1.0)
    rp = RegisterParams(margin=1.0, bootstrap_samples=200, confidence=0.9, seed=5)
    res = compare(new, old, "7", rp)
    low, high = bootstrap_mean_ci(new - old, 200, 0.9, seed=5)
    assert (res.ci_low, res.ci_high) == (low, high)
    assert res.reason == (
        f"90% CI upper bound {high:+.4f} nats/example < -margin = -1"
        f" (mean {(new - old).mean():+.4f}, CI [{low:+.4f}, {high:+.4f}])"
    )
    assert (res.champion_version, res.margin, res.n_examples) == ("7", 1.0, 400)
    assert res.new_neg_elbo == pytest.approx(new.mean())
    assert res.champion_neg_elbo == pytest.approx(old.mean())
    assert (res.confidence, res.bootstrap_samples) == (0.9, 200)
    assert res.rule == "ci_high < -margin, d = new - champion test -ELBO per example"
    assert compare(new, old, "7", rp) == res  # seeded: the same inputs, the same interval
    strict = RegisterParams(confidence=0.995, bootstrap_samples=50)
    assert compare(new, old, "7", strict).reason.startswith("99.5% CI upper bound ")


def test_a_lost_mean_comparison_says_so_without_a_negative_zero():
    new, old = _scores(shift=0.5, noise=1.0)
    res = compare(new, old, "2", RegisterParams(require_ci=False))
    assert res.reason.startswith(f"mean difference {(new - old).mean():+.4f} nats/example >= ")
    assert "-margin = 0 (" in res.reason
    assert res.rule == "mean_diff < -margin, d = new - champion test -ELBO per example"


def test_gate_tags_name_every_number_that_is_known_and_nothing_else():
    from pipelines.registry.gate import first_model, not_comparable

    rp = RegisterParams(margin=0.5)
    assert first_model(rp).tags() == {
        "gate.decision": "champion",
        "gate.reason": "no champion yet: the first model becomes champion",
        "gate.margin": "0.5",
        "gate.rule": "ci_high < -margin, d = new - champion test -ELBO per example",
    }
    res = not_comparable("input shapes differ", "4", rp)
    assert (res.decision, res.champion_version, res.margin) == ("challenger", "4", 0.5)
    assert res.reason == (
        "not comparable with champion: input shapes differ; promote by hand if intended"
    )
    assert res.rule == first_model(rp).rule


def test_models_that_share_no_minus_elbo_are_named_incomparable():
    from pipelines.registry.gate import incomparable
    from vae import ModelConfig, build_model

    def model(**kw):
        return build_model(
            ModelConfig(**{"input_shape": (4,), "hidden": (4,), "latent_dim": 2, **kw})
        )

    assert incomparable(model(), model()) is None
    assert incomparable(model(), model(input_shape=(6,))).startswith("input shapes differ ((4,)")
    assert "likelihoods differ (gaussian vs champion bernoulli)" in incomparable(
        model(), model(likelihood="bernoulli")
    )
    assert incomparable(model(), model(kind="ae")) == (
        "one model is variational and the other is not: no common -ELBO"
    )
