"""Errors the pipeline raises for things a user can fix. The CLI prints them as one line."""

import signal

from vae.errors import VAEError


class PipelineError(VAEError):
    """Bad input, a missing dataset, an unreachable service: something the user can act on."""


class ParamsError(PipelineError, ValueError):
    """params.yaml or a --set override is invalid."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (what `timeout`, CI and Prefect cancellation send), raised like Ctrl-C's
    KeyboardInterrupt so that every cleanup that handles one handles both."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
