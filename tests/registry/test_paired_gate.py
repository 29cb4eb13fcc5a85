"""The gate's pairing: the champion is scored with the new model's job, so every example gets the
same z samples (its key's seed from register.seed, register.mc_samples of them) and identical
weights differ by exactly 0; the scores are the same in this process and on 1, 2 or 4 Ray
workers, shard by shard."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pipelines.registry import register
from pipelines.registry.models import load_pair
from pipelines.scoring import shard_scoring
from pipelines.scoring.shard_scoring import noise_seeds
from tests.helpers.params import REGISTRY, params_in
from tests.registry.conftest import fit_model, split_tensor, write_stage_outputs
from vae import Batch, score_batches

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scored(staged_shards, tmp_path_factory):
    work = tmp_path_factory.mktemp("paired")
    params = params_in(work, *REGISTRY, "register.seed=7", shards=staged_shards, own_root=True)
    trained = fit_model(params, 1)
    job = register.RegisterJob.from_params(params)
    write_stage_outputs(params, trained, "paired")
    register.register_model(job, progress=False)  # the first pair: champion, nothing to score
    return job, trained.model, register._score_test_split(job, trained.model)


def test_identical_weights_give_a_difference_of_exactly_zero_for_every_example(scored, local_ray):
    """The champion as the gate gets it (its pt2 programs through mlflow.pytorch.load_model),
    scored here and in Ray tasks, against the trained model it was exported from."""
    job, model, test = scored
    champion, _ = load_pair(job.registry, "champion")
    diff = test.scores - register._champion_scores(job, champion, test)
    n_test = test.job.manifest.splits.test.samples
    assert diff.shape == (n_test,) and np.array_equal(diff, np.zeros(n_test))
    # In Ray tasks (the champion pickled as its MLflow files): one thread per task, float32
    # round-off as in the test of workers below.
    parts = shard_scoring.score_split(champion, test.job, True, 2, 1, progress=False)
    np.testing.assert_allclose(shard_scoring.per_example_neg_elbo(parts), test.scores, rtol=1e-5)


def test_both_models_are_scored_with_register_seed_and_mc_samples(scored, staged_shards):
    job, model, test = scored
    rp = job.reg
    assert (test.job.seed, test.job.mc_samples) == (rp.seed, rp.mc_samples) == (7, 2)
    # The scores are those of each example's own noise from that seed and sample count ...
    x, keys, _ = split_tensor(staged_shards, "test")
    want = score_batches(model, [Batch(x, noise_seeds(keys, 7))], mc_samples=2)
    np.testing.assert_allclose(test.scores, want.per_example_neg_elbo().numpy(), rtol=1e-6)
    # ... and depend on both, so a champion scored otherwise would not pair (test above).
    for other in (replace(test.job, seed=8), replace(test.job, mc_samples=1)):
        parts = shard_scoring.score_split(model, other, on_ray=False, progress=False)
        assert not np.array_equal(shard_scoring.per_example_neg_elbo(parts), test.scores)


def test_scores_and_merged_sums_are_identical_on_one_two_or_four_ray_workers(scored, local_ray):
    """Shards cut into pieces of a few batches each, as large shards are: the same figures."""
    _, model, test = scored
    whole = replace(test.job, iw_k=20, iw_fraction=0.3, batch_size=8)
    job = replace(whole, piece_examples=16)
    assert len(shard_scoring.pieces(job)) > len(job.manifest.splits.test.shards)
    here = shard_scoring.score_split(model, job, on_ray=False, progress=False)
    unsplit = shard_scoring.score_split(model, whole, on_ray=False, progress=False)
    np.testing.assert_array_equal(
        shard_scoring.per_example_neg_elbo(here), shard_scoring.per_example_neg_elbo(unsplit)
    )
    figures = {}
    for workers in (1, 2, 4):
        parts = shard_scoring.score_split(model, job, True, workers, 1, progress=False)
        assert [p.shard for p in parts] == [p.shard for p in here]
        sums, _ = shard_scoring.merge(parts, model.config.latent_dim)
        figures[workers] = sums.result(model.config, job.iw_k).to_dict()
        per_example = shard_scoring.per_example_neg_elbo(parts)
        # One thread per Ray task, two in this process: the same noise, float32 round-off.
        np.testing.assert_allclose(per_example, shard_scoring.per_example_neg_elbo(here), rtol=1e-5)
    assert figures[1] == figures[2] == figures[4]
    assert 0 < figures[1]["iw_examples"] < figures[1]["n_examples"]
    assert torch.isfinite(torch.tensor(figures[1]["iw_nll"]))


def test_a_damaged_shard_scored_in_a_ray_task_is_one_line_naming_it(
    scored, staged_shards, local_ray, tmp_path
):
    import shutil

    from pipelines.errors import PipelineError

    _, model, test = scored
    shards = tmp_path / "shards"
    shutil.copytree(staged_shards, shards)
    name = test.job.manifest.splits.test.shards[1].name
    raw = bytearray((shards / name).read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size: only the SHA-256 check inside the task sees it
    (shards / name).write_bytes(bytes(raw))
    job = replace(test.job, shards_dir=str(shards))
    for on_ray in (True, False):
        with pytest.raises(PipelineError) as err:
            shard_scoring.score_split(model, job, on_ray, 2, 1, progress=False)
        msg = str(err.value)
        assert name in msg and "SHA-256" in msg.upper() and "\n" not in msg, msg
