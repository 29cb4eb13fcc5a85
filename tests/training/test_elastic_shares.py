"""Elastic training's batch arithmetic: when the live world does not divide the global batch,
ranks take floor/ceil shares and weigh their loss so DDP's gradient average is still the
global batch's mean; the loader counts equal batches with each rank's own size."""

from __future__ import annotations

import copy

import pytest
import torch

from pipelines.data.shards.assignment import batches_per_epoch
from pipelines.errors import PipelineError
from pipelines.params_file import load_params
from pipelines.training.worker import loss_weight, rank_shares
from vae import ModelConfig, StepRuntime, build_model, train_one_epoch


@pytest.mark.parametrize("batch,world", [(128, 1), (128, 2), (128, 3), (7, 3), (100, 7), (5, 5)])
def test_shares_add_up_to_the_global_batch_and_differ_by_at_most_one(batch, world):
    shares = rank_shares(batch, world)
    assert len(shares) == world and sum(shares) == batch
    assert max(shares) - min(shares) <= 1
    assert shares == sorted(shares, reverse=True)  # the remainder goes to the first ranks
    # The weights average to one: the ranks' average of weighted means is the global mean.
    assert sum(loss_weight(batch, world, r) for r in range(world)) == pytest.approx(world)


def test_even_shares_weigh_one_and_a_batch_smaller_than_the_world_is_one_line():
    assert [loss_weight(128, 4, r) for r in range(4)] == [1.0] * 4
    with pytest.raises(PipelineError) as err:
        rank_shares(3, 4)
    assert "train.batch_size=3" in str(err.value) and "\n" not in str(err.value)


def test_weighted_uneven_shares_average_to_the_global_batch_gradient():
    """Three 'ranks' holding 3, 2 and 2 of a 7-example batch: the mean of their weighted
    gradients (what DDP's all-reduce computes) equals the gradient of the 7-example mean. A
    deterministic autoencoder, so no sampling noise depends on how the batch is cut."""
    torch.manual_seed(0)
    cfg = ModelConfig(kind="ae", input_shape=(6,), latent_dim=2, hidden=(5,))
    model = build_model(cfg, seed=0)
    x = torch.rand(7, 6)

    def step(m, batch, weight) -> list[torch.Tensor]:
        """One SGD step of lr 1 through train_one_epoch: the parameter change is -gradient."""
        before = [p.detach().clone() for p in m.parameters()]
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        train_one_epoch(m, opt, [batch], 0, 1.0, runtime=StepRuntime(loss_weight=weight))
        return [b - p.detach() for b, p in zip(before, m.parameters(), strict=True)]

    whole = step(copy.deepcopy(model), x, 1.0)
    shares = rank_shares(7, 3)
    starts = [0, shares[0], shares[0] + shares[1]]
    per_rank = [
        step(copy.deepcopy(model), x[s : s + n], loss_weight(7, 3, r))
        for r, (s, n) in enumerate(zip(starts, shares, strict=True))
    ]
    averaged = [sum(g) / 3 for g in zip(*per_rank, strict=True)]
    for a, b in zip(averaged, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Unweighted, the 3-example rank would count as much as a 2-example one: not the mean.
    unweighted = [
        step(copy.deepcopy(model), x[s : s + n], 1.0) for s, n in zip(starts, shares, strict=True)
    ]
    plain = [sum(g) / 3 for g in zip(*unweighted, strict=True)]
    assert any(
        not torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(plain, whole, strict=True)
    )


def test_equal_batch_counts_use_each_ranks_own_batch_size():
    counts = [60, 60, 60]
    # 180 samples on 3 ranks of 60; global batch 32 -> shares 11, 11, 10: the 10-rank needs 6.
    assert batches_per_epoch(counts, rank_shares(32, 3), 3) == 6
    assert batches_per_epoch(counts, 11, 3) == 6
    assert batches_per_epoch(counts, 12, 3) == 5


@pytest.mark.parametrize(
    "value,expected",
    [("2", (2, 2, False)), ("[1, 2]", (1, 2, True)), ("[3, 3]", (3, 3, False))],
)
def test_num_workers_takes_a_count_or_a_min_max_range(value, expected):
    c = load_params(None, [f"cluster.num_workers={value}"]).cluster
    assert (c.min_workers, c.max_workers, c.elastic) == expected


@pytest.mark.parametrize("value", ["0", "[2, 1]", "[0, 2]", "[1, 2, 3]", "true", "2.5"])
def test_a_bad_worker_count_or_range_is_one_line(value):
    from pipelines.errors import ParamsError

    with pytest.raises(ParamsError) as err:
        load_params(None, [f"cluster.num_workers={value}"])
    assert "cluster.num_workers" in str(err.value) and "\n" not in str(err.value)
