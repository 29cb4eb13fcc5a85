"""The decoder job: images sampled from a registered decoder (default: champion) as a PNG grid.
The decoder is the registered pt2 program, loaded with `mlflow.pytorch.load_model`; z and the
likelihood's mean are `vae`'s."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from pipelines import guards
from pipelines.errors import PipelineError
from pipelines.evaluation import figures
from pipelines.paths import Layout
from pipelines.registry import models as registry

MAX_IMAGES = 4096  # a 64 x 64 grid; more is a data set, not a figure


@dataclass
class GenerateResult:
    image: str
    n: int
    seed: int
    model_uri: str
    requested: str
    likelihood: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generate(
    reg: registry.ModelRegistry,
    where: Layout,
    n: int = 64,
    out: str | None = None,
    model_uri: str | None = None,
    seed: int = 0,
    cols: int = 8,
) -> GenerateResult:
    """z ~ N(0, I), decoded to the likelihood's mean image; the same seed gives the same grid."""
    if not 1 <= n <= MAX_IMAGES:
        raise PipelineError(f"-n must be between 1 and {MAX_IMAGES} images, not {n}")
    path = where.samples_path(out)
    # Checked before the model is pulled: a bad --out fails in a second, not after the work.
    guards.check_output_file(path, "--out", (".png",), figures.is_ours)
    model, version = registry.load_registered(reg, "decoder", model_uri)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        images = model.sample(n).numpy()
    lik = model.config.likelihood
    title = f"{n} samples, {version.uri} ({lik} decoder means, seed {seed})"
    figures.image_grid(images, path, title, cols=figures.grid_cols(n, cols))
    return GenerateResult(str(path), n, seed, version.uri, version.requested, lik)
