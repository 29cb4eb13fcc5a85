"""The Prefect server the retrain flow reports to, found and checked before the flow is imported:
importing it loads Prefect's engine, torch, MLflow and Ray (seconds of CPU, many more on a busy
machine), so a URL that cannot serve is one line in about a second instead."""

from __future__ import annotations

from pipelines.errors import PipelineError


def prefect_server() -> str | None:
    """The Prefect server's API URL, None for the embedded default (a temporary server)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def check_prefect_server(url: str) -> None:
    """PREFECT_API_URL names an http(s) URL where a Prefect server answers /health within
    network_timeout_s(): one line otherwise, before any work. Prefect's own client would
    retry a closed port into a traceback, and wait on a silent one for minutes."""
    from urllib.parse import urlsplit

    import requests

    from pipelines.timeouts import TIMEOUT_ENV, connect_timeout_s, network_timeout_s

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PipelineError(
            f"PREFECT_API_URL={url} is not an http(s) URL; set it like "
            "http://127.0.0.1:4200/api, or unset it for a temporary local server"
        )
    wait = network_timeout_s()
    try:
        answer = requests.get(url.rstrip("/") + "/health", timeout=(connect_timeout_s(), wait))
    except requests.RequestException as exc:
        raise PipelineError(
            f"the Prefect server at PREFECT_API_URL={url} does not answer within {wait:g} s "
            f"({type(exc).__name__}); start it with 'prefect server start --host 127.0.0.1', "
            f"fix the URL, or raise {TIMEOUT_ENV}"
        ) from exc
    try:
        healthy = answer.status_code == 200 and answer.json() is True
    except ValueError:
        healthy = False
    if not healthy:
        raise PipelineError(
            f"PREFECT_API_URL={url} answers, but not as a Prefect server (GET /health gave "
            f"HTTP {answer.status_code}); point it at the server's /api, e.g. "
            "http://127.0.0.1:4200/api"
        )
