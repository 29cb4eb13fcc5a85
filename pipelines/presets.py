"""Named presets: the best settings we know for each embedded source, as `--set` overrides.

params.yaml stays simple; `--preset NAME` on any subcommand applies a preset's overrides before
the command's own `--set`s (which win). A preset is only a list of overrides, so what it does is
visible here and in `--help`, and putting the same lines in params.yaml makes it the default
(which is what `dvc repro`, reading params.yaml only, needs).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import ParamsError


@dataclass(frozen=True)
class Preset:
    summary: str
    overrides: tuple[str, ...]


PRESETS: dict[str, Preset] = {
    # benchmarks/model_quality.py measures it against the plain VAE of the same size and budget.
    "digits-binary-iwae": Preset(
        "binarised digits, Bernoulli decoder, trained on the 50-sample IWAE bound",
        (
            "data.binarize=true",
            "model.likelihood=bernoulli",
            "model.objective=iwae",
            "model.mc_samples=50",
        ),
    ),  # fmt: skip
    "digits-learned-variance": Preset(
        "grey digits, Gaussian decoder with a learned per-pixel variance (floor 0.01)",
        ("model.variance=learned", "model.sigma_min=0.01"),
    ),
    # The beta-VAE set-up of Higgins et al. (2017) on the sprites factor grid; evaluate reports
    # its MIG. A starting point for disentanglement, not a measured optimum.
    "sprites-beta-vae": Preset(
        "64x64 sprites, conv beta-VAE (beta 4, 10 latents), Bernoulli decoder",
        (
            "data.source=sprites",
            "data.size=20000",
            "data.image_size=[64, 64]",
            "data.binarize=true",
            "model.arch=conv",
            "model.conv_channels=[]",
            "model.kind=beta_vae",
            "model.beta=4",
            "model.latent_dim=10",
            "model.likelihood=bernoulli",
            "train.batch_size=128",
            # A 4,096-pixel Bernoulli loss starts near 2,800 nats: unclipped, the first steps
            # left beta 1 stuck at the mean image (494 nats after 8 epochs against 102).
            "train.grad_clip_norm=10",
        ),
    ),  # fmt: skip
}


def preset_overrides(name: str | None) -> list[str]:
    """The overrides of preset `name` (none for None); one line naming the presets if unknown."""
    if name is None:
        return []
    if name not in PRESETS:
        raise ParamsError(
            f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))} "
            "('vae-pipeline train --help' lists what each sets)"
        )
    return list(PRESETS[name].overrides)


def presets_help() -> str:
    return "; ".join(f"{n}: {p.summary}" for n, p in sorted(PRESETS.items()))
