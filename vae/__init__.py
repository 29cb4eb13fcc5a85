"""The VAE model library: pure torch, no pipeline imports.

from vae import ModelConfig, build_model, fit, evaluate

Names load on first use (PEP 562): importing `vae.errors` alone, as the pipeline's error types
and every command line do, must not import torch, which takes seconds of a `stage` run and of
each Ray task that stages shards.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

# Each public name and the module that defines it.
_WHERE = {
    "ModelConfig": "config",
    "NoiseConfig": "config",
    "MIGResult": "disentanglement",
    "mutual_information_gap": "disentanglement",
    "kl_divergence": "distributions",
    "log_normal": "distributions",
    "log_standard_normal": "distributions",
    "reparameterize": "distributions",
    "ConfigError": "errors",
    "DataError": "errors",
    "NonFiniteLossError": "errors",
    "StorageError": "errors",
    "VAEError": "errors",
    "Batch": "evaluate",
    "EvalResult": "evaluate",
    "EvalSums": "evaluate",
    "evaluate": "evaluate",
    "iter_batches": "evaluate",
    "score_batches": "evaluate",
    "load_model": "io",
    "save_model": "io",
    "keyed_normal": "keyed_noise",
    "seeds_from_keys": "keyed_noise",
    "Autoencoder": "model",
    "ModelOutput": "model",
    "build_model": "model",
    "elbo": "objectives",
    "iw_log_likelihood": "objectives",
    "neg_elbo": "objectives",
    "FitResult": "train",
    "MicroBatch": "train",
    "StepRuntime": "train",
    "TrainConfig": "config",
    "TrainingState": "train",
    "fit": "train",
    "train_one_epoch": "train",
    "validate": "train",
}

__all__ = [
    "Autoencoder",
    "Batch",
    "ConfigError",
    "DataError",
    "EvalResult",
    "EvalSums",
    "FitResult",
    "MicroBatch",
    "MIGResult",
    "ModelConfig",
    "ModelOutput",
    "NoiseConfig",
    "NonFiniteLossError",
    "StepRuntime",
    "StorageError",
    "TrainConfig",
    "TrainingState",
    "VAEError",
    "build_model",
    "elbo",
    "evaluate",
    "fit",
    "iter_batches",
    "iw_log_likelihood",
    "keyed_normal",
    "seeds_from_keys",
    "kl_divergence",
    "load_model",
    "log_normal",
    "log_standard_normal",
    "mutual_information_gap",
    "neg_elbo",
    "reparameterize",
    "save_model",
    "score_batches",
    "train_one_epoch",
    "validate",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'vae' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"vae.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


class _Library(types.ModuleType):
    """Importing a submodule binds it on its package: `vae.evaluate` the module would then hide
    `vae.evaluate` the function (the eager imports this replaces bound the function last)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _WHERE and isinstance(value, types.ModuleType):
            return  # the name stays the public one, loaded by __getattr__
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Library


if TYPE_CHECKING:  # what type checkers and editors see: the same names, imported eagerly
    from vae.config import ModelConfig, NoiseConfig, TrainConfig
    from vae.disentanglement import MIGResult, mutual_information_gap
    from vae.distributions import kl_divergence, log_normal, log_standard_normal, reparameterize
    from vae.errors import ConfigError, DataError, NonFiniteLossError, StorageError, VAEError
    from vae.evaluate import Batch, EvalResult, EvalSums, evaluate, iter_batches, score_batches
    from vae.io import load_model, save_model
    from vae.keyed_noise import keyed_normal, seeds_from_keys
    from vae.model import Autoencoder, ModelOutput, build_model
    from vae.objectives import elbo, iw_log_likelihood, neg_elbo
    from vae.train import (
        FitResult,
        MicroBatch,
        StepRuntime,
        TrainingState,
        fit,
        train_one_epoch,
        validate,
    )
