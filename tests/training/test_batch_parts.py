"""How the global batch is cut into parts and spread over ranks, and where each example's noise
comes from: the arithmetic that makes the model a function of train.batch_parts, not of the
worker count (the bit-for-bit check on real Ray workers is in test_worker_count.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from pipelines.data.shards.assignment import batches_per_epoch
from pipelines.errors import PipelineError
from pipelines.params_file import load_params
from pipelines.scoring.shard_scoring import noise_seeds
from pipelines.training.batch_parts import (
    part_size,
    part_weight,
    rank_parts,
    train_noise_seeds,
    val_noise_seeds,
)
from vae import MicroBatch, ModelConfig, TrainConfig, build_model, fit, train_one_epoch


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 8])
def test_every_world_up_to_the_parts_computes_each_part_once_in_order(parts):
    for world in range(1, parts + 1):
        blocks = [rank_parts(parts, world, r) for r in range(world)]
        assert [p for b in blocks for p in b] == list(range(parts))
        assert all(len(b) >= 1 for b in blocks)
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_more_workers_than_parts_or_unequal_parts_are_one_line():
    with pytest.raises(PipelineError) as err:
        rank_parts(2, 3, 0)
    assert str(err.value).startswith("cluster.num_workers=3 is more than train.batch_parts=2")
    with pytest.raises(PipelineError) as err:
        part_size(33, 2)
    assert "train.batch_size=33" in str(err.value) and "multiple of 2" in str(err.value)
    assert part_size(128, 4) == 32


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _step(model, batches) -> list[torch.Tensor]:
    """The gradients one train_one_epoch step leaves (lr 0: the weights stay)."""
    train_one_epoch(model, torch.optim.SGD(model.parameters(), lr=0.0), [batches], 0, 1.0)
    return _grads(model)


def test_parts_weighted_as_a_world_would_add_up_to_the_whole_batch_gradient():
    """One rank holding both parts (weight 1/2 each) and two ranks of one part (weight 1, DDP
    halving the sum) compute the gradient of the whole batch's mean; with each example's own
    noise, the same to the bit (weights a power of two apart, a + b on either side)."""
    cfg = ModelConfig(input_shape=(6,), latent_dim=2, hidden=(5,))
    model = build_model(cfg, seed=0)
    x = torch.rand(8, 6)
    seeds = torch.arange(8, dtype=torch.int64) * 7919
    halves = [MicroBatch(x[:4], part_weight(2, 1), seeds[:4]),
              MicroBatch(x[4:], part_weight(2, 1), seeds[4:])]  # fmt: skip
    one_rank = _step(copy.deepcopy(model), halves)
    ranks = [
        _step(copy.deepcopy(model), [MicroBatch(x[a:b], part_weight(2, 2), seeds[a:b])])
        for a, b in ((0, 4), (4, 8))
    ]
    two_ranks = [(g0 + g1) / 2 for g0, g1 in zip(*ranks, strict=True)]  # DDP's average
    for a, b in zip(one_rank, two_ranks, strict=True):
        assert torch.equal(a, b)
    whole = _step(copy.deepcopy(model), [MicroBatch(x, 1.0, seeds)])
    for a, b in zip(one_rank, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_one_pass_over_the_whole_batch_is_another_sum_than_its_two_halves():
    """Why a worker computes each part alone: the whole batch in one backward pass (one part
    per worker, train.batch_parts: null, on 1 worker) rounds differently from two halves (2
    workers), and training amplifies the last bits into a seed's worth of spread."""
    cfg = ModelConfig(input_shape=(64,), latent_dim=8, hidden=(128,))
    model = build_model(cfg, seed=0)
    x = torch.rand(128, 64, generator=torch.Generator().manual_seed(0))
    seeds = torch.arange(128, dtype=torch.int64) * 7919
    halves = [MicroBatch(x[:64], 0.5, seeds[:64]), MicroBatch(x[64:], 0.5, seeds[64:])]
    two = _step(copy.deepcopy(model), halves)
    one = _step(copy.deepcopy(model), [MicroBatch(x, 1.0, seeds)])
    assert any(not torch.equal(a, b) for a, b in zip(one, two, strict=True))
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_non_finite_part_stops_the_step_before_any_weight_changes():
    from vae import NonFiniteLossError

    model = build_model(ModelConfig(input_shape=(4,), latent_dim=2, hidden=(3,)), seed=0)
    before = copy.deepcopy(model.state_dict())
    bad = torch.rand(4, 4)
    bad[0, 0] = 1e30  # finite data whose squared error overflows float32
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError, match=r"^loss became inf at epoch 0, step 0;"):
        train_one_epoch(model, opt, [[MicroBatch(torch.rand(4, 4)), MicroBatch(bad)]], 0, 1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_an_examples_noise_is_its_own_per_epoch_and_apart_from_validation_and_evaluate():
    keys = ["a", "b", "c"]
    e0 = train_noise_seeds(keys, 0, 0)
    assert torch.equal(train_noise_seeds(["c", "a"], 0, 0), e0[[2, 0]])  # any batch, any order
    assert not torch.equal(train_noise_seeds(keys, 0, 1), e0)  # a new draw each epoch
    assert not torch.equal(train_noise_seeds(keys, 1, 0), e0)
    assert not torch.equal(val_noise_seeds(keys, 0), e0)
    assert not torch.equal(noise_seeds(keys, 0), e0)  # evaluate's stream
    assert (e0 >= 0).all()


def test_a_daes_perturbation_is_each_examples_own_with_seeds():
    cfg = ModelConfig(kind="dae", input_shape=(5,), latent_dim=2, hidden=(3,),
                      noise={"gaussian_std": 0.5, "mask_prob": 0.3})  # fmt: skip
    model = build_model(cfg, seed=0)
    x = torch.rand(4, 5)
    seeds = torch.tensor([11, 22, 33, 44])
    torch.manual_seed(0)
    whole = model.corrupt(x, seeds)
    torch.manual_seed(1)  # the global stream plays no part
    parts = torch.cat([model.corrupt(x[2:], seeds[2:]), model.corrupt(x[:2], seeds[:2])])
    assert torch.equal(whole, parts[[2, 3, 0, 1]])
    assert not torch.equal(whole, x)
    assert (whole == 0).any(), "the mask takes some values"


def test_fit_computes_a_batch_in_parts_close_to_the_whole():
    cfg = ModelConfig(kind="ae", input_shape=(6,), latent_dim=2, hidden=(5,))
    x = torch.rand(64, 6)
    results = []
    for parts in (None, 4):
        model = build_model(cfg, seed=0)
        fit(model, x, x[:16], TrainConfig(epochs=2, batch_size=16, batch_parts=parts))
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)


def test_equal_batch_counts_use_each_parts_own_batch_size():
    counts = [60, 60, 60]
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


@pytest.mark.parametrize(
    "sets,expected",
    [
        (["train.batch_parts=2", "cluster.num_workers=1"], 2),  # params.yaml's: on any count
        (["train.batch_parts=4", "cluster.num_workers=2"], 4),
        (["train.batch_parts=null", "cluster.num_workers=3"], 3),  # one part per worker
        (["train.batch_parts=null", "cluster.num_workers=[1, 4]"], 4),  # elastic: the most
    ],
)
def test_training_and_staging_agree_on_the_number_of_parts(sets, expected):
    from pipelines.data.staging import StageJob
    from pipelines.training.job import TrainJob

    params = load_params(None, sets)
    assert TrainJob.from_params(params).batch_parts == expected
    assert StageJob.from_params(params).batch_parts == expected


def test_the_run_name_follows_the_model_not_the_worker_count():
    """With train.batch_parts set, 1, 2 or [1, 2] workers (and their CPUs) train the same
    model, so they share a run: more workers resume or reuse it. Without it (one part per
    worker) the worker count changes the model, and the run."""
    from pipelines.training.job import default_run_name

    def name(*sets: str) -> str:
        p = load_params(None, list(sets))
        return default_run_name(p.model, p.train, p.cluster, "d" * 64)

    one = name("cluster.num_workers=1", "train.batch_parts=2")
    assert name("cluster.num_workers=2", "train.batch_parts=2", "cluster.cpus_per_worker=2") == one
    assert name("cluster.num_workers=[1,2]", "train.batch_parts=2", "cluster.max_failures=0") == one
    assert name("cluster.num_workers=1", "train.batch_parts=4") != one  # another batch split
    assert name("cluster.num_workers=1", "train.batch_parts=2", "model.beta=2") != one
    assert name("cluster.num_workers=1", "train.batch_parts=2", "cluster.use_gpu=true") != one
    assert name("cluster.num_workers=1", "train.batch_parts=null") != name(
        "cluster.num_workers=2", "train.batch_parts=null"
    )
