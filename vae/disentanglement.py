"""Disentanglement against known generative factors: the Mutual Information Gap (MIG).

Chen et al. 2018, "Isolating Sources of Disentanglement in VAEs": for each factor v_k, the
latents are ranked by I(z_j; v_k) / H(v_k), and the factor's gap is the top value minus the
runner-up. A code that gives each factor one latent of its own scores 1; a code that spreads a
factor over several latents, or ignores it, scores 0. MIG is the mean gap over the factors.

Estimated as disentanglement_lib (`evaluation/metrics/mig.py`) does: each latent mean is cut into
n_bins equal-width bins over its observed range and I(z_j; v_k) is the plug-in estimate of the
contingency table, in nats. The plug-in estimate is biased upwards, by about
(n_bins - 1)(classes - 1) / 2N nats, so compare MIGs at equal N and n_bins only.

Written with numpy rather than sklearn.metrics.mutual_info_score (the same numbers; tested):
importing sklearn.metrics would add about 1.5 s to every `import vae`, Ray workers included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vae.errors import ConfigError, DataError

# A factor with more distinct values than this is taken as continuous and binned like the
# latents; fewer are taken as categories as they are (dSprites' largest factor has 40 values).
MAX_FACTOR_VALUES = 64


@dataclass(frozen=True)
class MIGResult:
    mig: float  # mean gap over the factors that vary
    gaps: np.ndarray  # (K,) gap per factor; NaN where the factor is constant (skipped)
    top_latent: np.ndarray  # (K,) latent holding most of each factor; -1 where skipped
    skipped: tuple[int, ...]  # factor columns that are constant: H(v_k) = 0, nothing to explain
    normalized_mi: np.ndarray  # (L, K) I(z_j; v_k) / H(v_k); NaN columns where skipped
    factor_entropy: np.ndarray  # (K,) H(v_k) in nats, of the discretised factor


def discretize(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index (0..n_bins-1) of each value, per column: n_bins equal-width bins spanning the
    column's min..max, the max in the last bin (np.histogram's edges); a constant column is
    all 0."""
    lo, hi = values.min(axis=0), values.max(axis=0)
    width = np.where(hi > lo, hi - lo, 1.0)
    idx = np.floor((values - lo) / width * n_bins).astype(np.int64)
    return np.clip(idx, 0, n_bins - 1)


def factor_codes(factors: np.ndarray, n_bins: int) -> np.ndarray:
    """Each factor column as class indices 0..C-1: its distinct values as they are, or n_bins
    equal-width bins where it has more than MAX_FACTOR_VALUES (a continuous factor)."""
    codes = np.empty(factors.shape, dtype=np.int64)
    for k in range(factors.shape[1]):
        values, inverse = np.unique(factors[:, k], return_inverse=True)
        if len(values) <= MAX_FACTOR_VALUES:
            codes[:, k] = inverse.reshape(-1)
        else:
            codes[:, k] = discretize(factors[:, k : k + 1], n_bins)[:, 0]
    return codes


def _entropy(p: np.ndarray, axis: int | None = None) -> np.ndarray:
    logs = np.log(np.where(p > 0, p, 1.0))
    return -(p * logs).sum(axis=axis)


def mutual_information(z_codes: np.ndarray, f_codes: np.ndarray) -> np.ndarray:
    """Plug-in I(z_j; f) in nats for every column j of z_codes (N, L) against one factor (N,),
    both class indices from 0; one joint histogram of all L columns at once."""
    n, n_latents = z_codes.shape
    n_z, n_f = int(z_codes.max()) + 1, int(f_codes.max()) + 1
    cell = (np.arange(n_latents) * n_z + z_codes) * n_f + f_codes[:, None]
    joint = np.bincount(cell.ravel(), minlength=n_latents * n_z * n_f)
    joint = joint.reshape(n_latents, n_z * n_f) / n
    h_z = _entropy(joint.reshape(n_latents, n_z, n_f).sum(axis=2), axis=1)
    h_f = _entropy(np.bincount(f_codes, minlength=n_f) / n)
    # I = H(z) + H(f) - H(z, f); a rounding error may take it a hair below 0
    return np.maximum(h_z + h_f - _entropy(joint, axis=1), 0.0)


def _check_inputs(latent_means: np.ndarray, factors: np.ndarray, n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 2:
        raise ConfigError(f"n_bins must be an integer of at least 2, got {n_bins!r}")
    if latent_means.ndim != 2 or factors.ndim != 2:
        raise DataError(
            f"MIG takes latent means (N, L) and factors (N, K), got shapes "
            f"{latent_means.shape} and {factors.shape}"
        )
    if len(latent_means) != len(factors) or len(factors) == 0:
        raise DataError(
            f"MIG needs one row of factors per latent mean, and at least one row; got "
            f"{len(latent_means)} latent means and {len(factors)} rows of factors"
        )
    if latent_means.shape[1] < 2:
        raise DataError(
            "MIG needs at least 2 latent dimensions (a gap to the runner-up), got "
            f"{latent_means.shape[1]}"
        )
    for name, a in (("latent means", latent_means), ("factors", factors)):
        if not np.isfinite(a).all():
            raise DataError(f"the {name} hold NaN or infinite values; MIG needs finite ones")


def mutual_information_gap(
    latent_means: np.ndarray, factors: np.ndarray, n_bins: int = 20
) -> MIGResult:
    """MIG of a code, latent_means (N, L) (posterior means, not samples), against its known
    factors (N, K), discrete or continuous. Constant factors are skipped and listed in the
    result; DataError if every factor is."""
    z = np.asarray(latent_means, dtype=np.float64)
    v = np.asarray(factors, dtype=np.float64)
    _check_inputs(z, v, n_bins)
    z_codes, f_codes = discretize(z, n_bins), factor_codes(v, n_bins)
    n_latents, n_factors = z.shape[1], v.shape[1]
    normalized = np.full((n_latents, n_factors), np.nan)
    entropy = np.zeros(n_factors)
    gaps, top = np.full(n_factors, np.nan), np.full(n_factors, -1, dtype=np.int64)
    for k in range(n_factors):
        entropy[k] = _entropy(np.bincount(f_codes[:, k]) / len(v))
        if entropy[k] <= 0:
            continue
        # MI <= H(v_k) exactly; the clip only absorbs rounding
        normalized[:, k] = np.minimum(mutual_information(z_codes, f_codes[:, k]) / entropy[k], 1)
        ranked = np.sort(normalized[:, k])[::-1]
        gaps[k], top[k] = ranked[0] - ranked[1], int(np.argmax(normalized[:, k]))
    skipped = tuple(int(k) for k in np.flatnonzero(entropy <= 0))
    if len(skipped) == n_factors:
        raise DataError(
            f"every factor is constant over the {len(v)} samples, so MIG has nothing to measure; "
            "evaluate on samples whose factors vary"
        )
    return MIGResult(float(np.nanmean(gaps)), gaps, top, skipped, normalized, entropy)
