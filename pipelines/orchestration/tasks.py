"""The retrain flow's Prefect tasks: each calls the very function its vae-pipeline subcommand
calls, with retries set by whether a second attempt repeats side effects (see each task)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import get_run_logger, task

from pipelines import tracking_checks
from pipelines.data.staging import StageJob, StageResult, stage_shards, write_record
from pipelines.data.versioning.dvc import (
    DataVersion,
    DvcCommandError,
    push_version,
    run_dvc,
    version_shards,
)
from pipelines.errors import ParamsError, PipelineError
from pipelines.evaluation.evaluate import EvaluateJob, EvaluateResult, evaluate_model
from pipelines.orchestration.prefect_api import prefect_server
from pipelines.orchestration.retention import PruneResult, RetentionJob, prune
from pipelines.orchestration.summary import ChampionBefore, DvcLockRecord
from pipelines.registry.models import CHAMPION, ModelRegistry, resolve
from pipelines.registry.register import RegisterJob, RegisterResult, register_model
from pipelines.storage import is_remote, location
from pipelines.training.driver import train_model
from pipelines.training.export import TrainResult
from pipelines.training.job import TrainJob

if TYPE_CHECKING:
    from pipelines.jobs.embed import EmbedJob, EmbedResult

# register's own lock is a file lock; with a Prefect server, this global concurrency limit makes
# it one alias move at a time across machines too.
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


# No retries: staging replaces the shards folder; a failure already left the old one in place.
@task(name="stage", cache_policy=None)
def stage_task(job: StageJob, record: Path, progress: bool) -> StageResult:
    result = stage_shards(job, progress=progress)
    shards = result.shards_dir
    in_repo = not is_remote(shards) and shards.is_relative_to(job.root)
    if in_repo and (job.root / "dvc.yaml").is_file():
        # As dvc.yaml's stage command does (`stage --record`): its later stages depend on this
        # record, which must change exactly when data.dvc does.
        write_record(result, record, job.data.shards_dir)
    return result


# No retries: `dvc add` of byte-identical shards is a no-op, but a failure here is local (disk,
# a .dvcignore mistake) and would fail again; DVC commands queue on one lock per repo instead.
@task(name="version-data", cache_policy=None)
def version_task(root: Path, shards_dir: str) -> DataVersion:
    if is_remote(shards_dir):
        reason = f"shards on object storage ({shards_dir}) are named by their manifest hash"
        return DataVersion(False, skipped_reason=reason)
    version = version_shards(Path(shards_dir), root)
    log = get_run_logger()
    if version.versioned:
        log.info("data version %s recorded in %s", version.dvc_md5, version.dvc_file)
    else:
        log.warning("skipping DVC versioning: %s", version.skipped_reason)
    return version


# Pushing is idempotent (content-addressed), and remotes fail transiently: retry with backoff.
@task(
    name="push-data",
    cache_policy=None,
    retries=3,
    retry_delay_seconds=[10, 60, 300],
    retry_condition_fn=_retry_push,
)
def push_task(version: DataVersion) -> None:
    push_version(version)
    get_run_logger().info("pushed %s to the default DVC remote", version.dvc_file)


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
def train_task(job: TrainJob, progress: bool) -> TrainResult:
    return train_model(job, progress=progress)


# Idempotent: rewrites metrics.json and the figures, re-logs them to the same MLflow run.
@task(name="evaluate", cache_policy=None, retries=2, retry_delay_seconds=[10, 30])
def evaluate_task(job: EvaluateJob, progress: bool) -> EvaluateResult:
    return evaluate_model(job, progress=progress)


# Read-only, so retried: the champion as it was before register moves any alias, for the report.
@task(name="read-champion", cache_policy=None, retries=2, retry_delay_seconds=[10, 30])
def champion_task(registry: ModelRegistry) -> ChampionBefore | None:
    # Unreachable is an error (retried), not "no champion".
    tracking_checks.check_reachable(registry.store)
    try:
        current = resolve(registry, "encoder", CHAMPION)
    except PipelineError:
        return None
    tags = current.tags
    return ChampionBefore(
        version=current.version,
        uri=current.uri,
        run_id=current.run_id,
        data_dvc_md5=tags.get("data.dvc_md5"),
        metrics={
            k.removeprefix("test."): float(v)
            for k, v in tags.items()
            if k.startswith("test.") and _is_number(v)
        },
    )


# No retries: registration is not idempotent. A failure deletes the new versions and puts the
# aliases back, but a retry after a late failure would register a second pair and gate the new
# model against itself. Re-run the flow instead: training resumes (already done) in seconds.
@task(name="register", cache_policy=None)
def register_task(job: RegisterJob, progress: bool) -> RegisterResult:
    # register's own lock is a file lock; the server's limit makes it one alias move at a time
    # across machines too.
    with server_limit(REGISTER_LIMIT.format(name=job.registry.name)):
        return register_model(job, progress=progress)


# One retry: embed writes its table atomically and may replace its own earlier output.
@task(name="embed", cache_policy=None, retries=1, retry_delay_seconds=30)
def embed_task(job: EmbedJob, encoder_uri: str, progress: bool) -> EmbedResult:
    from pipelines.jobs.embed import embed

    return embed(job, model_uri=encoder_uri, progress=progress)


# No retries: a failure here (a dep missing from the repo, a disk error) would fail again; the
# models and data are registered already, and the summary says dvc.lock was not updated.
@task(name="record-dvc-lock", cache_policy=None)
def record_task(job: StageJob, params_file: str, overrides: list[str]) -> DvcLockRecord:
    """What `dvc repro` would leave: dvc.lock records this run's deps, params and outs (`dvc
    commit` of the stages the flow just ran with the same commands), so `dvc status` is clean
    and checking out the commit and running `dvc repro` reproduces the run."""
    why = _not_recordable(job.root, job.data.shards_dir, params_file, overrides)
    if why is not None:
        get_run_logger().info("dvc.lock not updated: %s", why)
        return DvcLockRecord(False, reason=why)
    try:
        run_dvc(job.root, "commit", "--force", "--quiet")
    except DvcCommandError as exc:
        get_run_logger().warning("dvc.lock not updated: %s", exc)
        return DvcLockRecord(False, reason=str(exc))
    return DvcLockRecord(True, file=str(job.root / "dvc.lock"))


# Deleting is idempotent, so one retry; a failure never fails the run (the models are
# registered), the summary says what was not pruned.
@task(name="prune", cache_policy=None, retries=1, retry_delay_seconds=10)
def prune_task(job: RetentionJob) -> PruneResult:
    result = prune(job)
    get_run_logger().info(
        "retention: %d checkpoint folders and %d challenger versions deleted",
        len(result.deleted_runs),
        len(result.deleted_versions),
    )
    return result


def _not_recordable(
    root: Path, shards_dir: str, params_file: str, overrides: list[str]
) -> str | None:
    if not (root / "dvc.yaml").is_file() or not (root / ".dvc").is_dir():
        return f"{root} has no dvc.yaml or is not a DVC repo"
    if Path(params_file).resolve() != root / "params.yaml":
        return f"the run read {params_file}, dvc.yaml's stages read {root / 'params.yaml'}"
    if overrides:
        return "the run had overrides that params.yaml does not hold (dvc.lock would not say so)"
    shards = location(shards_dir, root)
    if is_remote(shards) or not shards.is_relative_to(root):
        return "the shards are outside the repo (dvc.yaml's stage writes them inside it)"
    return None


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


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
