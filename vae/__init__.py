"""The VAE model library: pure torch, no pipeline imports.

from vae import ModelConfig, build_model, fit, evaluate
"""

from vae.config import ModelConfig, NoiseConfig
from vae.disentanglement import MIGResult, mutual_information_gap
from vae.distributions import kl_divergence, log_normal, log_standard_normal, reparameterize
from vae.errors import ConfigError, DataError, NonFiniteLossError, StorageError, VAEError
from vae.evaluate import Batch, EvalResult, EvalSums, evaluate, iter_batches, score_batches
from vae.io import load_model, save_model
from vae.keyed_noise import keyed_normal
from vae.model import Autoencoder, ModelOutput, build_model
from vae.objectives import elbo, iw_log_likelihood, neg_elbo
from vae.train import (
    FitResult,
    StepRuntime,
    TrainConfig,
    TrainingState,
    fit,
    train_one_epoch,
    validate,
)

__all__ = [
    "Autoencoder",
    "Batch",
    "ConfigError",
    "DataError",
    "EvalResult",
    "EvalSums",
    "FitResult",
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
