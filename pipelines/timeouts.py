"""How long a server may take to answer before a command gives up in one line.

One setting for every network call we make ourselves or configure (the object store's botocore
client, Prefect's /health check and API client, MLflow's reachability checks): a silent server
must cost seconds, never a wait without end. Set VAE_PIPELINE_NETWORK_TIMEOUT_S to allow more
on a slow network.
"""

from __future__ import annotations

import os

from pipelines.errors import PipelineError

TIMEOUT_ENV = "VAE_PIPELINE_NETWORK_TIMEOUT_S"
DEFAULT_S = 30.0
CONNECT_S = 5.0  # a TCP connection is up in well under a second on any network that works


def network_timeout_s() -> float:
    """Seconds one request may wait for an answer (VAE_PIPELINE_NETWORK_TIMEOUT_S, default 30)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86_400:
        raise PipelineError(f"{TIMEOUT_ENV}={raw} must be a number of seconds from 0 to 86400")
    return value


def connect_timeout_s() -> float:
    return min(CONNECT_S, network_timeout_s())


def set_library_deadlines() -> None:
    """The same deadline for the clients we do not call ourselves, unless the user set theirs:
    MLflow's (120 s and 7 retries with backoff by default: minutes on a silent server) and
    Prefect's API client. Environment settings, so Ray workers and Prefect workers inherit them;
    set before the libraries read their settings."""
    wait = f"{network_timeout_s():g}"
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", wait)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("PREFECT_API_REQUEST_TIMEOUT", wait)
