"""Errors the library raises on bad configuration or bad data.

Every message names the offending thing and says what to do, so the CLI can print it as one line.
"""


class VAEError(Exception):
    """Base class: anything the user can fix by changing input or configuration."""


class ConfigError(VAEError, ValueError):
    """A model or training configuration that cannot work."""


class DataError(VAEError, ValueError):
    """Data that does not fit the model: wrong shape, NaN/inf, non-binary for Bernoulli."""


class StorageError(VAEError, OSError):
    """A model could not be written (a full disk, a read-only folder); errno says which."""

    def __str__(self) -> str:
        # The message already says what happened; OSError would prefix "[Errno N]".
        return self.strerror or super().__str__()


class NonFiniteLossError(VAEError, FloatingPointError):
    """Training produced a NaN or infinite loss."""
