"""Errors the pipeline raises for things a user can fix. The CLI prints them as one line."""

from vae.errors import VAEError


class PipelineError(VAEError):
    """Bad input, a missing dataset, an unreachable service: something the user can act on."""


class ParamsError(PipelineError, ValueError):
    """params.yaml or a --set override is invalid."""
