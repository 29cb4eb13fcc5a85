"""The encoder and decoder as self-contained MLflow models (pt2 exported programs).

`torch.export` traces forward into a graph, so the logged models load with plain MLflow and
torch, without this project. The graph has no input checks: data-dependent raises (the NaN
and range checks of `Autoencoder.prepare_input`) cannot be traced. Our own loader keeps them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pipelines.registry.models import ROLES
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
    """z (N, L) -> the decoder's mean image (N, *input_shape)."""

    def __init__(self, model: Autoencoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: Tensor) -> Tensor:
        out = self.model.likelihood.mean(self.model.decode(z))
        return out.reshape(-1, *self.model.config.input_shape)


def encoder_layout(model: Autoencoder) -> str:
    latent = model.config.latent_dim
    if model.config.variational:
        return f"[mu | logvar]: mu = out[:, :{latent}], logvar = out[:, {latent}:]"
    return f"code: out[:, :{latent}] (deterministic autoencoder, no log-variance)"


def descriptions(model: Autoencoder) -> dict[str, str]:
    cfg = model.config
    shape = ", ".join(map(str, cfg.input_shape))
    plain = (
        f" {ROLES[0]} and {ROLES[1]} versions of a pair carry the same full model as "
        "extra_files/model.safetensors + config.json, for the project's vae.load_model."
    )
    return {
        "encoder": (
            f"VAE encoder ({cfg.kind}, {cfg.likelihood} likelihood). pt2 model: input float32 "
            f"(N, {shape}) scaled to [0, 1], output float32 {encoder_layout(model)}. No input "
            "checks in the graph: reject NaN yourself." + plain
        ),
        "decoder": (
            f"VAE decoder ({cfg.kind}, {cfg.likelihood} likelihood). pt2 model: input z float32 "
            f"(N, {cfg.latent_dim}), e.g. from N(0, I); output the decoder's mean image float32 "
            f"(N, {shape})." + plain
        ),
    }


def _requirements() -> list[str]:
    import mlflow

    # Explicit, so MLflow does not load the model in a subprocess to infer them (seconds);
    # the local build tag (+cpu) is dropped because no index serves it.
    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]


def log_models(
    model: Autoencoder, run_id: str, weights_dir: Path, example_x: Tensor
) -> dict[str, tuple[str, str]]:
    """Log encoder and decoder into the run; returns role -> (model URI, logged model id).

    example_x needs at least 2 rows: MLflow exports a size-1 batch dimension as static.
    """
    import mlflow
    from mlflow.models import infer_signature

    model = model.eval()
    modules = {"encoder": EncoderExport(model).eval(), "decoder": DecoderExport(model).eval()}
    with torch.no_grad():
        x = example_x.float().reshape(-1, *model.config.input_shape).numpy()
        z = model.encode(torch.from_numpy(x))[0].numpy()
        examples = {"encoder": x, "decoder": np.ascontiguousarray(z, dtype=np.float32)}
    extra = [str(weights_dir / WEIGHTS), str(weights_dir / CONFIG)]
    logged = {}
    for role in ROLES:
        example = examples[role]
        with torch.no_grad():
            out = modules[role](torch.from_numpy(example)).numpy()
        info = mlflow.pytorch.log_model(
            modules[role],
            name=role,
            input_example=example,
            signature=infer_signature(example, out),
            serialization_format="pt2",
            extra_files=extra,
            pip_requirements=_requirements(),
            run_id=run_id,  # passed on to Model.log: attach to the training run
        )
        logged[role] = (info.model_uri, info.model_id)
    return logged
