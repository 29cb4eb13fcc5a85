"""Scheduling the retrain flow: the Prefect server it reports to, checked before anything starts,
and `vae-pipeline serve`, the flow served on a cron schedule."""

from __future__ import annotations

from pathlib import Path

from pipelines.errors import ParamsError, PipelineError
from pipelines.orchestration.flows import retrain_flow
from pipelines.orchestration.prefect_api import check_prefect_server, prefect_server
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
