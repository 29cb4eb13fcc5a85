"""Scheduling the retrain flow: the Prefect server it reports to, checked before anything starts,
and `vae-pipeline serve`, the flow served on a cron schedule."""

from __future__ import annotations

from pathlib import Path

from pipelines.errors import ParamsError, PipelineError
from pipelines.orchestration.flows import prefect_server, retrain_flow
from pipelines.params_file import load_params


def prefect_api_url() -> str:
    """The Prefect server `serve` registers with; a one-line error when there is none."""
    url = prefect_server()  # the environment, else the active Prefect profile
    if not url:
        raise PipelineError(
            "serve needs a running Prefect server: start one with "
            "'prefect server start --host 127.0.0.1' and "
            "'export PREFECT_API_URL=http://127.0.0.1:4200/api' "
            "(or 'python infra/local/stack.py up && source .stack/env.sh')"
        )
    check_prefect_server(url)
    return url


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


def check_cron(cron: str, timezone: str) -> None:
    """Prefect's own cron check, stricter than params.py's shape check."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"]
        raise ParamsError(f"schedule: {msg}; fix schedule.cron / schedule.timezone") from exc


def serve_retrain(params_file: str, overrides: list[str], push: bool = True) -> None:
    """Register the `retrain` deployment with a cron schedule and run its flows (blocks)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    params = load_params(params_file, overrides)
    sched = params.schedule
    check_cron(sched.cron, sched.timezone)
    prefect_api_url()
    retrain_flow.serve(
        name=sched.deployment,
        schedules=[Cron(sched.cron, timezone=sched.timezone)],
        parameters={
            # Absolute, so the served runs read the same file whatever their working folder.
            "params_file": str(Path(params_file).resolve()),
            "overrides": list(overrides),
            "push": push,
        },
        tags=["vae-pipeline"],
        limit=1,  # one run at a time: a late run and the next one would train side by side
        # The installed package, not a file path relative to where serve was started.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
