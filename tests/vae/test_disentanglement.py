"""The Mutual Information Gap: known codes give the scores the definition predicts."""

from __future__ import annotations

import numpy as np
import pytest

from vae import DataError, mutual_information_gap
from vae.disentanglement import discretize, factor_codes, mutual_information

N = 4000
SIZES = (3, 6, 10)  # categorical factors, dSprites-like


def _factors(seed: int = 0, n: int = N) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, s, n) for s in SIZES], axis=1)


def _noise(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, scale, shape)


def _disentangled(factors: np.ndarray, extra: int = 2) -> np.ndarray:
    """One latent per factor (plus tiny noise), then `extra` latents of pure noise."""
    z = factors / factors.max(axis=0) + _noise(factors.shape, 1, 0.01)
    return np.concatenate([z, _noise((len(factors), extra), 2)], axis=1)


def test_a_code_with_one_latent_per_factor_scores_close_to_one():
    v = _factors()
    res = mutual_information_gap(_disentangled(v), v)
    assert res.mig > 0.95
    assert np.all(res.gaps > 0.95)
    np.testing.assert_array_equal(res.top_latent, [0, 1, 2])
    assert res.skipped == ()


def test_each_factor_copied_into_two_latents_has_no_gap():
    v = _factors()
    z = np.repeat(v, 2, axis=1) + _noise((N, 2 * v.shape[1]), 3, 0.01)
    res = mutual_information_gap(z, v)
    assert res.mig < 0.05
    # the information is all there, only shared: both copies explain their factor fully
    assert np.nanmin(res.normalized_mi.max(axis=0)) > 0.95


def test_a_rotated_code_mixing_two_factors_equally_scores_near_zero():
    rng = np.random.default_rng(4)
    v = rng.uniform(-1, 1, (N, 2))  # continuous factors: binned like the latents
    z = np.stack([v[:, 0] + v[:, 1], v[:, 0] - v[:, 1]], axis=1)
    res = mutual_information_gap(z, v)
    assert res.mig < 0.05
    assert np.all(res.normalized_mi > 0.1)  # each latent does carry both factors


def test_a_random_code_scores_about_zero():
    v = _factors()
    res = mutual_information_gap(_noise((N, 6), 5), v)
    assert res.mig < 0.02
    assert np.nanmax(res.normalized_mi) < 0.05  # what is left is the plug-in estimate's bias


def test_a_continuous_factor_held_by_one_latent_scores_high():
    rng = np.random.default_rng(6)
    v = rng.uniform(0, 1, (N, 1))
    z = np.concatenate([v + _noise((N, 1), 7, 0.001), _noise((N, 3), 8)], axis=1)
    res = mutual_information_gap(z, v)
    assert res.mig > 0.9 and res.top_latent[0] == 0


def test_permuting_the_latents_changes_neither_mig_nor_the_gaps():
    v = _factors()
    z = _disentangled(v) + 0.3 * _noise((N, 5), 9)  # imperfect, so the gaps are not all 1
    perm = np.array([3, 0, 4, 2, 1])
    base, permuted = mutual_information_gap(z, v), mutual_information_gap(z[:, perm], v)
    assert permuted.mig == pytest.approx(base.mig, abs=1e-12)
    np.testing.assert_allclose(permuted.gaps, base.gaps, atol=1e-12)
    np.testing.assert_array_equal(perm[permuted.top_latent], base.top_latent)
    assert 0.2 < base.mig < 0.95


def test_a_constant_factor_is_skipped_and_reported():
    v = _factors()
    with_constant = np.insert(v, 1, 7, axis=1)
    z = _disentangled(v)
    res = mutual_information_gap(z, with_constant)
    assert res.skipped == (1,)
    assert np.isnan(res.gaps[1]) and res.top_latent[1] == -1 and res.factor_entropy[1] == 0
    assert res.mig == pytest.approx(mutual_information_gap(z, v).mig, abs=1e-12)


def test_the_same_inputs_give_the_same_result():
    v = _factors()
    z = _disentangled(v) + 0.3 * _noise((N, 5), 10)
    a, b = mutual_information_gap(z, v), mutual_information_gap(z.copy(), v.copy())
    assert a.mig == b.mig
    np.testing.assert_array_equal(a.normalized_mi, b.normalized_mi)


def test_bins_and_mutual_information_agree_with_numpy_histograms_and_sklearn():
    """The reference implementation (disentanglement_lib): np.histogram's edges, np.digitize,
    sklearn's mutual_info_score, and the entropy as a factor's information about itself."""
    from sklearn.metrics import mutual_info_score

    v = _factors(11, 1500)
    z = _disentangled(v) + 0.5 * _noise((1500, 5), 12)
    codes = discretize(z, 20)
    for j in range(z.shape[1]):
        edges = np.histogram(z[:, j], 20)[1]
        np.testing.assert_array_equal(codes[:, j], np.digitize(z[:, j], edges[:-1]) - 1)
    f = factor_codes(v, 20)
    res = mutual_information_gap(z, v)
    for k in range(v.shape[1]):
        ours = mutual_information(codes, f[:, k])
        theirs = [mutual_info_score(codes[:, j], f[:, k]) for j in range(z.shape[1])]
        np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)
        h = mutual_info_score(f[:, k], f[:, k])
        assert res.factor_entropy[k] == pytest.approx(h, rel=1e-12)
        np.testing.assert_allclose(res.normalized_mi[:, k], np.array(theirs) / h, rtol=1e-10)


def test_bad_inputs_raise_one_line_errors_that_say_what_is_needed():
    v = _factors(n=10)
    with pytest.raises(DataError, match="one row of factors per latent mean"):
        mutual_information_gap(np.zeros((9, 3)), v)
    with pytest.raises(DataError, match="at least 2 latent dimensions"):
        mutual_information_gap(np.zeros((10, 1)), v)
    with pytest.raises(DataError, match="NaN or infinite"):
        mutual_information_gap(np.full((10, 3), np.nan), v)
    with pytest.raises(DataError, match="every factor is constant"):
        mutual_information_gap(np.random.default_rng(0).normal(size=(10, 3)), np.ones((10, 2)))
    with pytest.raises(ValueError, match="n_bins"):
        mutual_information_gap(np.zeros((10, 3)), v, n_bins=1)


def test_bad_inputs_are_named_exactly_and_the_edges_of_what_is_allowed_are_accepted():
    rng = np.random.default_rng(0)
    v = _factors(n=50)
    z = rng.normal(size=(50, 3))
    with pytest.raises(DataError, match=r"^MIG takes latent means \(N, L\) and factors \(N, K\)"):
        mutual_information_gap(np.zeros(50), v)
    with pytest.raises(DataError, match=r"^MIG needs at least 2 latent dimensions \(a gap"):
        mutual_information_gap(np.zeros((50, 1)), v)
    with pytest.raises(DataError, match=r"^the latent means hold NaN"):
        mutual_information_gap(np.full((50, 3), np.inf), v)
    with pytest.raises(DataError, match=r"^the factors hold NaN"):
        mutual_information_gap(z, np.full(v.shape, np.nan))
    with pytest.raises(DataError, match=r"evaluate on samples whose factors vary$"):
        mutual_information_gap(z[:1], v[:1])  # one row: every factor is constant
    with pytest.raises(ValueError, match="n_bins"):
        mutual_information_gap(z, v, n_bins=True)  # a bool is not a bin count
    assert np.isfinite(mutual_information_gap(z, v, n_bins=2).mig)  # the smallest bin count


def test_a_binary_factor_is_measured_not_skipped_as_constant():
    rng = np.random.default_rng(1)
    f = rng.integers(0, 2, size=(400, 1)).astype(float)  # entropy ln 2 < 1 nat
    z = np.column_stack([f[:, 0] + 0.01 * rng.normal(size=400), rng.normal(size=400)])
    res = mutual_information_gap(z, f)
    assert res.skipped == ()
    assert res.top_latent.tolist() == [0]
    assert res.mig > 0.9


def test_factors_with_up_to_64_values_are_categories_and_more_are_binned():
    ramp = np.arange(64.0)[:, None] ** 2  # 64 unevenly spaced values
    assert factor_codes(ramp, n_bins=10)[:, 0].tolist() == list(range(64))
    wide = np.arange(65.0)[:, None]
    assert factor_codes(wide, n_bins=5)[:, 0].tolist() == discretize(wide, 5)[:, 0].tolist()
    assert set(factor_codes(wide, n_bins=5)[:, 0].tolist()) == set(range(5))


def test_a_constant_column_falls_in_the_first_bin():
    values = np.column_stack([np.full(5, 3.0), np.arange(5.0)])
    assert discretize(values, 4)[:, 0].tolist() == [0] * 5
    assert discretize(values, 4)[:, 1].tolist() == [0, 1, 2, 3, 3]
