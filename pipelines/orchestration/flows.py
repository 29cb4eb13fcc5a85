"""Prefect orchestration: the `retrain` flow (stage -> version -> train -> evaluate -> register).

Each task calls the very function its `vae-pipeline` subcommand calls, so a scheduled run, a CLI
run and `dvc repro` share one implementation per stage. Retries are set per task by whether a
second attempt repeats side effects (see each task). Nothing is deleted on failure: each stage
writes its results atomically, so a later failure leaves the shards, data.dvc, checkpoints and
the registry's champion as they were.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from pipelines.data.versioning.dvc import check_push_remote, find_repo
from pipelines.data.versioning.lineage import manifest_sha256
from pipelines.errors import ParamsError
from pipelines.orchestration.jobs import RetrainJobs
from pipelines.orchestration.prefect_api import prefect_server
from pipelines.orchestration.report import render_report
from pipelines.orchestration.summary import RetrainSummary
from pipelines.orchestration.tasks import (
    champion_task,
    embed_task,
    evaluate_task,
    prune_task,
    push_task,
    record_task,
    register_task,
    server_limit,
    stage_task,
    train_task,
    version_task,
)
from pipelines.params_file import load_params
from pipelines.registry.models import CHAMPION
from pipelines.storage import location

REPORT_KEY_PREFIX = "retrain-"
# One retrain per repo at a time: two would stage into the same shards folder, train under the
# same run name and overwrite each other's outputs. The second one waits for the first. With a
# Prefect server, the server's global concurrency limits do this across machines (a file lock
# only sees one machine); the file lock serves the embedded default, which has no server.
RETRAIN_LOCK = ".retrain.lock"
RETRAIN_LIMIT = "vae-retrain-{name}"


# -- the flow ---------------------------------------------------------------------------------


def where_to_look(jobs: RetrainJobs) -> dict[str, str]:
    """What a user opens after a run: the MLflow UI, the champion URIs, the figures."""
    uri = jobs.store.uri
    ui = uri if uri.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {uri}"
    return {
        "mlflow_ui": ui,
        "champion_encoder": f"models:/{jobs.registry.model_name('encoder')}@{CHAMPION}",
        "champion_decoder": f"models:/{jobs.registry.model_name('decoder')}@{CHAMPION}",
        "figures": str(jobs.where.evaluate_dir),
    }


@contextlib.contextmanager
def one_retrain_at_a_time(name: str, root: Path, summary: RetrainSummary) -> Iterator[None]:
    """Hold the retrain limit (the server's for this model name, else the repo's file lock,
    released if the process dies); wait while another run holds it. summary.waited_s says
    how long this run waited, summary.lock which kind guarded it."""
    started = time.monotonic()
    if prefect_server() is not None:
        limit = RETRAIN_LIMIT.format(name=name)
        get_run_logger().info("taking the Prefect server's concurrency limit %s", limit)
        summary.lock = f"prefect global concurrency limit {limit}"
        with server_limit(limit):
            summary.waited_s = round(time.monotonic() - started, 1)
            yield
        return
    lock = FileLock(str(root / RETRAIN_LOCK))
    summary.lock = f"file lock {lock.lock_file}"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        get_run_logger().info("another retrain holds %s; waiting for it to finish", lock.lock_file)
        lock.acquire()
    summary.waited_s = round(time.monotonic() - started, 1)
    try:
        yield
    finally:
        lock.release()


def _stage_and_version(
    jobs: RetrainJobs, push: bool, progress: bool, summary: RetrainSummary
) -> None:
    log = get_run_logger()
    summary.step = "stage"
    staged = stage_task(jobs.stage, jobs.where.stage_record, progress)
    data = summary.data
    data.staged = staged
    log.info("staged %s", data.to_dict()["summary"])
    data.manifest_sha256 = manifest_sha256(location(str(staged.shards_dir)))
    summary.step = "version-data"
    version = data.version = version_task(jobs.root, str(staged.shards_dir))
    if version.versioned and version.dvc_md5 != staged.dvc_md5:
        log.warning("dvc recorded %s, staging computed %s", version.dvc_md5, staged.dvc_md5)
    if not push:
        data.push_note = "no (push disabled)"
    elif not version.versioned:
        data.push_note = "no (not versioned)"
    else:
        summary.step = "push-data"
        push_task(version)
        data.push_note = "yes"


def _train_evaluate_register(jobs: RetrainJobs, progress: bool, summary: RetrainSummary) -> None:
    log = get_run_logger()
    summary.step = "train"
    trained = summary.train = train_task(jobs.train, progress)
    log.info(
        "trained %s: best val -ELBO %.3f at epoch %d",
        trained.run_name,
        trained.best_val_neg_elbo,
        trained.best_epoch,
    )
    summary.step = "evaluate"
    evaluated = summary.evaluated = evaluate_task(jobs.evaluate, progress)
    log.info("test -ELBO %.3f nats per example", evaluated.metrics["neg_elbo"])
    summary.step = "read-champion"
    summary.champion_before = champion_task(jobs.registry)
    summary.step = "register"
    registered = summary.register = register_task(jobs.register, progress)
    log.info("promotion: %s (%s)", registered.decision, registered.reason)
    _follow_champion(jobs, progress, summary)


def _prune(jobs: RetrainJobs, summary: RetrainSummary) -> None:
    summary.step = "prune"
    try:
        summary.retention = prune_task(jobs.prune)
    except Exception as exc:  # noqa: BLE001 - pruning is housekeeping, the run succeeded
        get_run_logger().warning("retention: nothing more pruned: %s", exc)
        summary.retention_error = str(exc)


def _follow_champion(jobs: RetrainJobs, progress: bool, summary: RetrainSummary) -> None:
    """Downstream tables follow the champion: a promotion embeds with the new encoder (its
    version, not the alias, so a later promotion cannot slip in); a challenger embeds nothing."""
    register = summary.register
    if register.decision != CHAMPION:
        why = {"unchanged": "the pair was registered before"}.get(
            register.decision, f"the new pair is a {register.decision}"
        )
        summary.embed = {"skipped": why}
        return
    if not jobs.embed_on_promotion:
        summary.embed = {"skipped": "embed.on_promotion is false"}
        return
    summary.step = "embed"
    embedded = embed_task(jobs.embed, register.model_uris["encoder"], progress)
    summary.embed = {"output": embedded.output, "model_uri": embedded.model_uri,
                     "n_samples": embedded.n_samples}  # fmt: skip
    get_run_logger().info("embedded %d samples with %s into %s", embedded.n_samples,
                          embedded.model_uri, embedded.output)  # fmt: skip


def _publish(name: str, summary: RetrainSummary) -> None:
    """The run's Markdown report; a report that cannot be saved never fails the run."""
    from prefect.runtime import flow_run

    summary.flow_run = {"name": flow_run.name, "id": flow_run.id, "url": flow_run.ui_url}
    key = REPORT_KEY_PREFIX + "".join(c if c.isalnum() else "-" for c in name.lower())
    try:
        create_markdown_artifact(
            markdown=render_report(summary.to_dict()),
            key=key,
            description=f"retrain {summary.status}: data, metrics vs champion, decision, links",
        )
    except Exception as exc:  # noqa: BLE001 - the models and data are what matter
        get_run_logger().warning("could not save the run report artifact: %s", exc)


def _result(summary: RetrainSummary) -> dict[str, Any]:
    """The flow's return value (an edge: the CLI prints it as JSON), 'where to look' last."""
    register, lock = summary.register, summary.dvc_lock
    whole = summary.to_dict()
    out: dict[str, Any] = {
        "metrics": whole.get("metrics"),
        "decision": register and register.decision,
        "reason": register and register.reason,
        "data_dvc_md5": summary.data.version and summary.data.version.dvc_md5,
        "data_pushed": summary.data.push_note,
        "mlflow_run_id": summary.train and summary.train.mlflow_run_id,
        "new_encoder": register and register.model_uris["encoder"],
        "new_decoder": register and register.model_uris["decoder"],
        "embeddings": (summary.embed or {}).get("output"),
        "dvc_lock": lock and (lock.file or lock.reason),
        "summary": {k: v for k, v in whole.items() if k != "where"},
    }
    out.update(summary.where)
    return out


@flow(name="retrain", log_prints=True)
def retrain_flow(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    push: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Stage the data source into shards, version them with DVC (data.dvc, dvc push), train on
    Ray, evaluate, and register behind the promotion gate. Publishes a Markdown report."""
    if not Path(params_file).is_file():
        # A scheduled run in the wrong folder must not fall back to defaults and stage there.
        raise ParamsError(
            f"params file {params_file} not found in {Path.cwd()}; run from the repo root or "
            "pass the path (--params, or the deployment's params_file)"
        )
    params = load_params(params_file, list(overrides or []))  # bad params fail before any work
    if push and (repo := find_repo(params.root)):
        check_push_remote(repo)  # no dvc-s3 or a store that is down: now, not after staging
    get_run_logger().info(
        "retrain with %s (root %s)%s",
        params_file,
        params.root,
        f", overrides {list(overrides)}" if overrides else "",
    )
    jobs = RetrainJobs.from_params(params)
    name = jobs.registry.name
    summary = RetrainSummary(where=where_to_look(jobs))
    try:
        with one_retrain_at_a_time(name, jobs.root, summary):
            _stage_and_version(jobs, push, progress, summary)
            _train_evaluate_register(jobs, progress, summary)
            summary.step = "record-dvc-lock"
            summary.dvc_lock = record_task(jobs.stage, params_file, list(overrides or []))
            _prune(jobs, summary)
    except Exception as exc:
        summary.status, summary.failed_step, summary.error = "failed", summary.step, f"{exc}"
        _publish(name, summary)
        raise
    summary.status, summary.step = "completed", None
    _publish(name, summary)
    where = summary.where
    get_run_logger().info(
        "done. MLflow UI: %s | champion: %s, %s | figures: %s",
        where["mlflow_ui"],
        where["champion_encoder"],
        where["champion_decoder"],
        where["figures"],
    )
    return _result(summary)


# -- scheduling -------------------------------------------------------------------------------
