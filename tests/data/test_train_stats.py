"""The manifest's train statistics: integer sums of uint8 pixels give the float64 pass's numbers."""

import numpy as np
import pytest

from pipelines.data.train_stats import TrainStats


def _float_pass(chunks, divide_by):
    """The definition: float64 sums of the scaled pixels, chunk by chunk."""
    sums, pixels = 0.0, 0
    for x in chunks:
        v = x.astype(np.float64) / divide_by
        sums = sums + np.stack([v.sum(axis=(0, 2, 3)), (v * v).sum(axis=(0, 2, 3))])
        pixels += x.shape[0] * x.shape[2] * x.shape[3]
    mean = sums[0] / pixels
    std = np.sqrt(np.maximum(sums[1] / pixels - mean * mean, 0))
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_stats_match_the_float64_definition(dtype):
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, (n, 3, 9, 7)).astype(dtype) for n in (50, 0, 33, 1)]
    divide_by = 255.0 if dtype == "uint8" else 1.0
    if dtype == "float32":
        chunks = [x / np.float32(255) for x in chunks]
    stats = TrainStats(3, divide_by)
    for x in chunks:
        stats.add(x)
    mean, std = _float_pass(chunks, divide_by)
    assert stats.to_dict() == {"train_mean_per_channel": mean, "train_std_per_channel": std}


def test_a_strided_channel_view_is_summed_like_a_copy():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (20, 2, 8, 8), dtype=np.uint8)
    a, b = TrainStats(2, 255.0), TrainStats(2, 255.0)
    a.add(x[:, :, ::2, ::2])
    b.add(np.ascontiguousarray(x[:, :, ::2, ::2]))
    assert a.to_dict() == b.to_dict()


def test_no_train_samples_give_zeros_not_nan():
    stats = TrainStats(1, 255.0)
    stats.add(np.zeros((0, 1, 4, 4), dtype=np.uint8))
    assert stats.to_dict() == {"train_mean_per_channel": [0.0], "train_std_per_channel": [0.0]}
