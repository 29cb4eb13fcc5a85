"""The encoder and decoder as self-contained MLflow models (pt2 exported programs).

`torch.export` traces forward into a graph, so the logged models load with plain MLflow and
torch, without this project; the pipeline's own jobs load them the same way
(`registry.models.load_registered`). The graph has no input checks: data-dependent raises (the
NaN and range checks of `Autoencoder.prepare_input`) cannot be traced, so that adapter runs
them before the graph. The decoder gives the likelihood's parameters (Bernoulli logits, not
probabilities), so that the gate's nats are computed from them exactly as `vae` does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pipelines.registry.models import ROLES, model_metadata
from vae import Autoencoder
from vae.io import CONFIG, WEIGHTS


class EncoderExport(nn.Module):
    """x (N, *input_shape) -> [mu | logvar] as one (N, 2L) tensor; an AE gives its code (N, L).

    One tensor, because MLflow's pyfunc wrapper accepts a single output tensor only.
    """

    def __init__(self, model: Autoencoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        mu, logvar = self.model.encode(x)
        return mu if logvar is None else torch.cat([mu, logvar], -1)


class DecoderExport(nn.Module):
    """z (N, L) -> the decoder's output as an image (N, *input_shape): Gaussian means, or
    Bernoulli logits. The likelihood's state (a learned sigma) travels in the program's state
    as model.likelihood.*, unused by the graph: the registry adapter reads it from there."""

    def __init__(self, model: Autoencoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: Tensor) -> Tensor:
        return self.model.decode(z).reshape(-1, *self.model.config.input_shape)


def encoder_layout(model: Autoencoder) -> str:
    latent = model.config.latent_dim
    if model.config.variational:
        return f"[mu | logvar]: mu = out[:, :{latent}], logvar = out[:, {latent}:]"
    return f"code: out[:, :{latent}] (deterministic autoencoder, no log-variance)"


def decoder_layout(model: Autoencoder) -> str:
    if model.config.likelihood == "bernoulli":
        return "Bernoulli logits: the mean image is sigmoid(out)"
    return "Gaussian means: the mean image itself"


def descriptions(model: Autoencoder) -> dict[str, str]:
    cfg = model.config
    shape = ", ".join(map(str, cfg.input_shape))
    plain = (
        f" {ROLES[0]} and {ROLES[1]} versions of a pair carry the same full model as "
        "extra_files/model.safetensors + config.json, for the project's vae.load_model; the "
        "pipeline's own jobs run the pt2 programs."
    )
    return {
        "encoder": (
            f"VAE encoder ({cfg.kind}, {cfg.likelihood} likelihood). pt2 model: input float32 "
            f"(N, {shape}) scaled to [0, 1], output float32 {encoder_layout(model)}. No input "
            "checks in the graph: reject NaN yourself." + plain
        ),
        "decoder": (
            f"VAE decoder ({cfg.kind}, {cfg.likelihood} likelihood). pt2 model: input z float32 "
            f"(N, {cfg.latent_dim}), e.g. from N(0, I); output float32 (N, {shape}), "
            f"{decoder_layout(model)}." + plain
        ),
    }


def _requirements() -> list[str]:
    import mlflow

    # Explicit, so MLflow does not load the model in a subprocess to infer them (seconds);
    # the local build tag (+cpu) is dropped because no index serves it.
    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]


def pt2_models(model: Autoencoder, example_x: Tensor) -> dict[str, dict]:
    """role -> the keyword arguments of mlflow.pytorch.log_model / save_model that export it.

    example_x needs at least 2 rows: MLflow exports a size-1 batch dimension as static (a
    dynamic one takes any batch size, 1 included; RegisteredModel runs a batch of 3 on load).
    Each model's metadata holds the export format and the ModelConfig, which RegisteredModel
    builds the model from.
    """
    from mlflow.models import infer_signature

    model = model.eval()
    modules = {"encoder": EncoderExport(model).eval(), "decoder": DecoderExport(model).eval()}
    with torch.no_grad():
        x = example_x.float().reshape(-1, *model.config.input_shape).numpy()
        z = model.encode(torch.from_numpy(x))[0].numpy()
        examples = {"encoder": x, "decoder": np.ascontiguousarray(z, dtype=np.float32)}
    kwargs = {}
    for role in ROLES:
        example = examples[role]
        with torch.no_grad():
            out = modules[role](torch.from_numpy(example)).numpy()
        kwargs[role] = {
            "pytorch_model": modules[role],
            "input_example": example,
            "signature": infer_signature(example, out),
            "serialization_format": "pt2",
            "pip_requirements": _requirements(),
            "metadata": model_metadata(model.config, role),
        }
    return kwargs


def log_models(
    model: Autoencoder, run_id: str, weights_dir: Path, example_x: Tensor
) -> dict[str, tuple[str, str]]:
    """Log encoder and decoder into the run (pt2_models, plus our plain weights as
    extra_files); returns role -> (model URI, logged model id)."""
    import mlflow

    extra = [str(weights_dir / WEIGHTS), str(weights_dir / CONFIG)]
    logged = {}
    for role, kwargs in pt2_models(model, example_x).items():
        info = mlflow.pytorch.log_model(
            name=role,
            extra_files=extra,
            run_id=run_id,  # passed on to Model.log: attach to the training run
            **kwargs,
        )
        logged[role] = (info.model_uri, info.model_id)
    return logged
