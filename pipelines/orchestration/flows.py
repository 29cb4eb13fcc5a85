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
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from pipelines import tracking, tracking_checks
from pipelines.data.staging import stage_shards, write_record
from pipelines.data.versioning.dvc import (
    DataVersion,
    DvcCommandError,
    push_version,
    run_dvc,
    version_shards,
)
from pipelines.data.versioning.lineage import manifest_sha256
from pipelines.errors import ParamsError, PipelineError
from pipelines.evaluation.evaluate import evaluate_model
from pipelines.orchestration.report import render_report
from pipelines.params import Params, load_params
from pipelines.paths import evaluate_dir, stage_record
from pipelines.registry.models import CHAMPION, model_name, resolve
from pipelines.registry.register import register_model
from pipelines.storage import is_remote, location
from pipelines.training.driver import train_model

REPORT_KEY_PREFIX = "retrain-"
# One retrain per repo at a time: two would stage into the same shards folder, train under the
# same run name and overwrite each other's outputs. The second one waits for the first. With a
# Prefect server, the server's global concurrency limits do this across machines (a file lock
# only sees one machine); the file lock serves the embedded default, which has no server.
RETRAIN_LOCK = ".retrain.lock"
RETRAIN_LIMIT = "vae-retrain-{name}"
REGISTER_LIMIT = "vae-register-{name}"
# A crashed holder's slot frees itself after this long; a live one renews its lease.
LIMIT_LEASE_S = 300


def _exception(state) -> BaseException | None:
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we only classify it
        return exc
    return None


def _retry_push(task, task_run, state) -> bool:
    """Retry network and lock trouble, not a missing remote."""
    exc = _exception(state)
    return not (isinstance(exc, DvcCommandError) and not exc.retryable)


def _retry_train(task, task_run, state) -> bool:
    return not isinstance(_exception(state), ParamsError)


# -- tasks: each one calls the same function as its CLI subcommand ----------------------------


# No retries: staging replaces the shards folder; a failure already left the old one in place.
@task(name="stage", cache_policy=None)
def stage_task(params: Params, progress: bool) -> dict[str, Any]:
    result = stage_shards(params, progress=progress)
    shards = result.shards_dir
    in_repo = not is_remote(shards) and shards.is_relative_to(params.root)
    if in_repo and (params.root / "dvc.yaml").is_file():
        # As dvc.yaml's stage command does (`stage --record`): its later stages depend on this
        # record, which must change exactly when data.dvc does.
        write_record(result, stage_record(params), params)
    return result.to_dict()


# No retries: `dvc add` of byte-identical shards is a no-op, but a failure here is local (disk,
# a .dvcignore mistake) and would fail again; DVC commands queue on one lock per repo instead.
@task(name="version-data", cache_policy=None)
def version_task(params: Params, shards_dir: str) -> dict[str, Any]:
    if is_remote(shards_dir):
        reason = f"shards on object storage ({shards_dir}) are named by their manifest hash"
        return DataVersion(False, skipped_reason=reason).to_dict()
    version = version_shards(Path(shards_dir), params.root)
    log = get_run_logger()
    if version.versioned:
        log.info("data version %s recorded in %s", version.dvc_md5, version.dvc_file)
    else:
        log.warning("skipping DVC versioning: %s", version.skipped_reason)
    return version.to_dict()


# Pushing is idempotent (content-addressed), and remotes fail transiently: retry with backoff.
@task(
    name="push-data",
    cache_policy=None,
    retries=3,
    retry_delay_seconds=[10, 60, 300],
    retry_condition_fn=_retry_push,
)
def push_task(version: dict[str, Any]) -> None:
    push_version(DataVersion(**version))
    get_run_logger().info("pushed %s to the default DVC remote", version["dvc_file"])


# One retry: the same params and data give the same run name, so a second attempt resumes from
# the latest checkpoint and continues the same MLflow run (no epoch is logged twice). Ray's
# FailureConfig already restarts failed workers inside one attempt; this covers the driver side
# (lost Ray cluster, tracking server blip, max_failures used up by preemptions).
@task(
    name="train",
    cache_policy=None,
    retries=1,
    retry_delay_seconds=30,
    retry_condition_fn=_retry_train,
)
def train_task(params: Params, progress: bool) -> dict[str, Any]:
    return train_model(params, progress=progress).to_dict()


# Idempotent: rewrites metrics.json and the figures, re-logs them to the same MLflow run.
@task(name="evaluate", cache_policy=None, retries=2, retry_delay_seconds=[10, 30])
def evaluate_task(params: Params, progress: bool) -> dict[str, Any]:
    return evaluate_model(params, progress=progress).to_dict()


# Read-only, so retried: the champion as it was before register moves any alias, for the report.
@task(name="read-champion", cache_policy=None, retries=2, retry_delay_seconds=[10, 30])
def champion_task(params: Params) -> dict[str, Any] | None:
    tracking_checks.check_reachable(params)  # unreachable is an error (retried), not "no champion"
    try:
        current = resolve(params, "encoder", CHAMPION)
    except PipelineError:
        return None
    tags = current.tags
    return {
        "version": current.version,
        "uri": current.uri,
        "run_id": current.run_id,
        "data_dvc_md5": tags.get("data.dvc_md5"),
        "metrics": {
            k.removeprefix("test."): float(v)
            for k, v in tags.items()
            if k.startswith("test.") and _is_number(v)
        },
    }


# No retries: registration is not idempotent. A failure deletes the new versions and puts the
# aliases back, but a retry after a late failure would register a second pair and gate the new
# model against itself. Re-run the flow instead: training resumes (already done) in seconds.
@task(name="register", cache_policy=None)
def register_task(params: Params, progress: bool) -> dict[str, Any]:
    # register's own lock is a file lock; the server's limit makes it one alias move at a time
    # across machines too.
    with server_limit(REGISTER_LIMIT.format(name=params.registry.name)):
        return register_model(params, progress=progress).to_dict()


# One retry: embed writes its table atomically and may replace its own earlier output.
@task(name="embed", cache_policy=None, retries=1, retry_delay_seconds=30)
def embed_task(params: Params, encoder_uri: str, progress: bool) -> dict[str, Any]:
    from pipelines.jobs.embed import embed

    return embed(params, model_uri=encoder_uri, progress=progress).to_dict()


# No retries: a failure here (a dep missing from the repo, a disk error) would fail again; the
# models and data are registered already, and the summary says dvc.lock was not updated.
@task(name="record-dvc-lock", cache_policy=None)
def record_task(params: Params, params_file: str, overrides: list[str]) -> dict[str, Any]:
    """What `dvc repro` would leave: dvc.lock records this run's deps, params and outs (`dvc
    commit` of the stages the flow just ran with the same commands), so `dvc status` is clean
    and checking out the commit and running `dvc repro` reproduces the run."""
    why = _not_recordable(params, params_file, overrides)
    if why is not None:
        get_run_logger().info("dvc.lock not updated: %s", why)
        return {"recorded": False, "reason": why}
    try:
        run_dvc(params.root, "commit", "--force", "--quiet")
    except DvcCommandError as exc:
        get_run_logger().warning("dvc.lock not updated: %s", exc)
        return {"recorded": False, "reason": str(exc)}
    return {"recorded": True, "file": str(params.root / "dvc.lock")}


# Deleting is idempotent, so one retry; a failure never fails the run (the models are
# registered), the summary says what was not pruned.
@task(name="prune", cache_policy=None, retries=1, retry_delay_seconds=10)
def prune_task(params: Params) -> dict[str, Any]:
    from pipelines.orchestration.retention import prune

    result = prune(params)
    get_run_logger().info(
        "retention: %d checkpoint folders and %d challenger versions deleted",
        len(result.deleted_runs),
        len(result.deleted_versions),
    )
    return result.to_dict()


def _not_recordable(params: Params, params_file: str, overrides: list[str]) -> str | None:
    root = params.root
    if not (root / "dvc.yaml").is_file() or not (root / ".dvc").is_dir():
        return f"{root} has no dvc.yaml or is not a DVC repo"
    if Path(params_file).resolve() != root / "params.yaml":
        return f"the run read {params_file}, dvc.yaml's stages read {root / 'params.yaml'}"
    if overrides:
        return "the run had overrides that params.yaml does not hold (dvc.lock would not say so)"
    shards = location(params.data.shards_dir, root)
    if is_remote(shards) or not shards.is_relative_to(root):
        return "the shards are outside the repo (dvc.yaml's stage writes them inside it)"
    return None


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


# -- the flow ---------------------------------------------------------------------------------


def where_to_look(params: Params) -> dict[str, str]:
    """What a user opens after a run: the MLflow UI, the champion URIs, the figures."""
    uri = tracking.tracking_uri(params)
    ui = uri if uri.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {uri}"
    return {
        "mlflow_ui": ui,
        "champion_encoder": f"models:/{model_name(params, 'encoder')}@{CHAMPION}",
        "champion_decoder": f"models:/{model_name(params, 'decoder')}@{CHAMPION}",
        "figures": str(evaluate_dir(params)),
    }


def prefect_server() -> str | None:
    """The Prefect server's API URL, None for the embedded default (a temporary server)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


@contextlib.contextmanager
def server_limit(name: str) -> Iterator[None]:
    """Hold the Prefect server's global concurrency limit `name` (one slot, created on first
    use); without a server, nothing to hold."""
    if prefect_server() is None:
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, 1)
    with concurrency(name, occupy=1, lease_duration=LIMIT_LEASE_S, strict=True):
        yield


@contextlib.contextmanager
def one_retrain_at_a_time(params: Params, summary: dict) -> Iterator[None]:
    """Hold the retrain limit (the server's for this model name, else the repo's file lock,
    released if the process dies); wait while another run holds it. summary["waited_s"] says
    how long this run waited, summary["lock"] which kind guarded it."""
    started = time.monotonic()
    if prefect_server() is not None:
        name = RETRAIN_LIMIT.format(name=params.registry.name)
        get_run_logger().info("taking the Prefect server's concurrency limit %s", name)
        summary["lock"] = f"prefect global concurrency limit {name}"
        with server_limit(name):
            summary["waited_s"] = round(time.monotonic() - started, 1)
            yield
        return
    lock = FileLock(str(params.root / RETRAIN_LOCK))
    summary["lock"] = f"file lock {lock.lock_file}"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        get_run_logger().info("another retrain holds %s; waiting for it to finish", lock.lock_file)
        lock.acquire()
    summary["waited_s"] = round(time.monotonic() - started, 1)
    try:
        yield
    finally:
        lock.release()


def _stage_and_version(params: Params, push: bool, progress: bool, summary: dict) -> None:
    log = get_run_logger()
    summary["step"] = "stage"
    staged = stage_task(params, progress)
    log.info("staged %s", staged["summary"])
    data = summary["data"]
    data.update(source=staged["source"], summary=staged["summary"])
    data["manifest_sha256"] = manifest_sha256(location(staged["shards_dir"]))
    summary["step"] = "version-data"
    version = version_task(params, staged["shards_dir"])
    data.update(version)
    if version["versioned"] and version["dvc_md5"] != staged["dvc_md5"]:
        log.warning("dvc recorded %s, staging computed %s", version["dvc_md5"], staged["dvc_md5"])
    if not push:
        data["push_note"] = "no (push disabled)"
    elif not version["versioned"]:
        data["push_note"] = "no (not versioned)"
    else:
        summary["step"] = "push-data"
        push_task(version)
        data["push_note"] = "yes"


def _train_evaluate_register(params: Params, progress: bool, summary: dict) -> None:
    log = get_run_logger()
    summary["step"] = "train"
    summary["train"] = train_task(params, progress)
    log.info(
        "trained %s: best val -ELBO %.3f at epoch %d",
        summary["train"]["run_name"],
        summary["train"]["best_val_neg_elbo"],
        summary["train"]["best_epoch"],
    )
    summary["step"] = "evaluate"
    evaluated = evaluate_task(params, progress)
    summary["metrics"], summary["figures"] = evaluated["metrics"], evaluated["figures"]
    log.info("test -ELBO %.3f nats per example", evaluated["metrics"]["neg_elbo"])
    summary["step"] = "read-champion"
    summary["champion_before"] = champion_task(params)
    summary["step"] = "register"
    summary["register"] = register_task(params, progress)
    log.info("promotion: %s (%s)", summary["register"]["decision"], summary["register"]["reason"])
    _follow_champion(params, progress, summary)


def _prune(params: Params, summary: dict) -> None:
    summary["step"] = "prune"
    try:
        summary["retention"] = prune_task(params)
    except Exception as exc:  # noqa: BLE001 - pruning is housekeeping, the run succeeded
        get_run_logger().warning("retention: nothing more pruned: %s", exc)
        summary["retention"] = {"error": str(exc)}


def _follow_champion(params: Params, progress: bool, summary: dict) -> None:
    """Downstream tables follow the champion: a promotion embeds with the new encoder (its
    version, not the alias, so a later promotion cannot slip in); a challenger embeds nothing."""
    register = summary["register"]
    if register["decision"] != CHAMPION:
        why = {"unchanged": "the pair was registered before"}.get(
            register["decision"], f"the new pair is a {register['decision']}"
        )
        summary["embed"] = {"skipped": why}
        return
    if not params.embed.on_promotion:
        summary["embed"] = {"skipped": "embed.on_promotion is false"}
        return
    summary["step"] = "embed"
    embedded = embed_task(params, register["encoder_uri"], progress)
    summary["embed"] = {k: embedded[k] for k in ("output", "model_uri", "n_samples")}
    get_run_logger().info("embedded %d samples with %s into %s", embedded["n_samples"],
                          embedded["model_uri"], embedded["output"])  # fmt: skip


def _publish(params: Params, summary: dict) -> None:
    """The run's Markdown report; a report that cannot be saved never fails the run."""
    from prefect.runtime import flow_run

    summary["flow_run"] = {"name": flow_run.name, "id": flow_run.id, "url": flow_run.ui_url}
    key = REPORT_KEY_PREFIX + "".join(
        c if c.isalnum() else "-" for c in params.registry.name.lower()
    )
    try:
        create_markdown_artifact(
            markdown=render_report(summary),
            key=key,
            description=f"retrain {summary['status']}: data, metrics vs champion, decision, links",
        )
    except Exception as exc:  # noqa: BLE001 - the models and data are what matter
        get_run_logger().warning("could not save the run report artifact: %s", exc)


def _result(summary: dict) -> dict[str, Any]:
    """The flow's return value: the CLI prints its scalars, 'where to look' last."""
    register = summary.get("register") or {}
    data = summary["data"]
    out: dict[str, Any] = {
        "metrics": summary.get("metrics"),
        "decision": register.get("decision"),
        "reason": register.get("reason"),
        "data_dvc_md5": data.get("dvc_md5"),
        "data_pushed": data.get("push_note"),
        "mlflow_run_id": (summary.get("train") or {}).get("mlflow_run_id"),
        "new_encoder": register.get("encoder_uri"),
        "new_decoder": register.get("decoder_uri"),
        "embeddings": (summary.get("embed") or {}).get("output"),
        "dvc_lock": (summary.get("dvc_lock") or {}).get("file")
        or (summary.get("dvc_lock") or {}).get("reason"),
        "summary": {k: v for k, v in summary.items() if k != "where"},
    }
    out.update(summary["where"])
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
    get_run_logger().info(
        "retrain with %s (root %s)%s",
        params_file,
        params.root,
        f", overrides {list(overrides)}" if overrides else "",
    )
    summary: dict[str, Any] = {"status": "running", "data": {}, "where": where_to_look(params)}
    try:
        with one_retrain_at_a_time(params, summary):
            _stage_and_version(params, push, progress, summary)
            _train_evaluate_register(params, progress, summary)
            summary["step"] = "record-dvc-lock"
            summary["dvc_lock"] = record_task(params, params_file, list(overrides or []))
            _prune(params, summary)
    except Exception as exc:
        summary.update(status="failed", failed_step=summary.get("step"), error=f"{exc}")
        _publish(params, summary)
        raise
    summary["status"] = "completed"
    summary.pop("step", None)
    _publish(params, summary)
    where = summary["where"]
    get_run_logger().info(
        "done. MLflow UI: %s | champion: %s, %s | figures: %s",
        where["mlflow_ui"],
        where["champion_encoder"],
        where["champion_decoder"],
        where["figures"],
    )
    return _result(summary)


# -- scheduling -------------------------------------------------------------------------------
