"""RegisteredModel, what embed, generate and the gate run: the exported pt2 programs loaded with
mlflow.pytorch.load_model, with vae's likelihood around them, compute exactly what the trained
model does, for every likelihood and kind, and after the trip to a Ray task (pickled as their
graphs and tensors)."""

from __future__ import annotations

import pickle
from pathlib import Path

import mlflow.pytorch
import pytest
import torch

from pipelines.errors import PipelineError
from pipelines.registry.export import pt2_models
from pipelines.registry.models import RegisteredModel
from pipelines.scoring.shard_scoring import noise_seeds
from vae import Batch, ModelConfig, build_model, score_batches


def _saved_with_mlflow(model, x: torch.Tensor, folder: Path) -> dict[str, dict[str, bytes]]:
    """Each role saved as register logs it, read back as the files RegisteredModel loads."""
    files = {}
    for role, kwargs in pt2_models(model, x[:4]).items():
        mlflow.pytorch.save_model(path=str(folder / role), **kwargs)
        root = folder / role
        files[role] = {
            str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()
        }
    return files


@pytest.mark.parametrize(
    "settings",
    [
        {"likelihood": "bernoulli"},  # the decoder program gives logits, not probabilities
        {"variance": "learned"},  # sigma lives in the decoder program's state
        {},  # a fixed sigma: a buffer the decoder's graph never reads
        {"kind": "ae"},  # no log-variance
    ],
    ids=["bernoulli", "gaussian-learned-sigma", "gaussian-fixed-sigma", "ae"],
)
def test_programs_loaded_through_mlflow_score_embed_and_sample_as_the_trained_model(
    tmp_path, settings
):
    cfg = ModelConfig(input_shape=(1, 8, 8), latent_dim=3, hidden=(16,), **settings)
    model = build_model(cfg, seed=0).eval()
    if settings.get("variance") == "learned":
        with torch.no_grad():  # a sigma that is not the initial one, per pixel
            model.likelihood.log_sigma.copy_(torch.linspace(-3, -1, cfg.input_dim))
    x = torch.rand(37, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    if cfg.likelihood == "bernoulli":
        x = (x > 0.5).float()
    loaded = RegisteredModel.from_files(cfg, _saved_with_mlflow(model, x, tmp_path), "models:/m/1")
    keys = [f"k{i}" for i in range(len(x))]
    iw_k = 5 if cfg.variational else 0
    once = pickle.loads(pickle.dumps(loaded))
    twice = pickle.loads(pickle.dumps(once))  # as through Ray Client's proxy: two trips
    for candidate in (loaded, once, twice):
        want = score_batches(model, [Batch(x, noise_seeds(keys, 3))], iw_k, mc_samples=2)
        got = score_batches(candidate, [Batch(x, noise_seeds(keys, 3))], iw_k, mc_samples=2)
        assert torch.equal(got.per_example_neg_elbo(), want.per_example_neg_elbo())
        assert (got.iw_sum, got.kl) == (want.iw_sum, want.kl)
        for a, b in zip(candidate.embed(x[:1]), model.embed(x[:1]), strict=True):
            assert (a is None and b is None) or torch.equal(a, b)  # a batch of 1 too
        torch.manual_seed(1)
        sampled = candidate.sample(5)
        torch.manual_seed(1)
        assert torch.equal(sampled, model.sample(5))


def test_the_input_checks_stay_in_front_of_the_program(tmp_path):
    cfg = ModelConfig(input_shape=(1, 8, 8), latent_dim=3, hidden=(16,))
    model = build_model(cfg, seed=0).eval()
    x = torch.rand(4, 1, 8, 8)
    files = _saved_with_mlflow(model, x, tmp_path)
    loaded = RegisteredModel.from_files(cfg, files, "models:/m/1")
    x[1, 0, 2, 2] = float("nan")
    for candidate in (loaded, pickle.loads(pickle.dumps(loaded))):  # guards dropped, not checks
        with pytest.raises(Exception, match="NaN"):
            candidate.embed(x)
        with pytest.raises(Exception, match="example shape"):
            candidate.embed(torch.rand(2, 1, 8, 7))
    only_encoder = RegisteredModel.from_files(cfg, {"encoder": files["encoder"]}, "models:/m/1")
    with pytest.raises(PipelineError, match="models:/m/1 holds no decoder"):
        only_encoder.sample(2)
