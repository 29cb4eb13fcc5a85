"""Pure parts of the retrain flow: the Markdown report, DVC versioning and its lock, prefect.yaml."""

from __future__ import annotations

import inspect
import threading
import time

import pytest
import yaml

from pipelines.data.versioning.dvc import DvcCommandError, dvc_lock, run_dvc, version_shards
from pipelines.errors import ParamsError
from pipelines.orchestration.report import render_report
from pipelines.params_file import load_params
from tests.helpers.params import REPO
from tests.helpers.repos import make_repo

COMPLETED = {
    "status": "completed",
    "flow_run": {"name": "steady-cow", "id": "f1", "url": None},
    "data": {
        "source": "digits",
        "summary": "train 1237 samples in 10 shards",
        "versioned": True,
        "dvc_file": "data.dvc",
        "dvc_md5": "9a16ec2d7beab68d83d3852f09b14cd1.dir",
        "manifest_sha256": "2b6c62fe" * 8,
        "push_note": "yes",
    },
    "train": {"mlflow_run_id": "run123", "tracking_uri": "sqlite:////x/mlflow.db"},
    "metrics": {"likelihood": "gaussian", "neg_elbo": 120.0, "kl": 12.5, "active_units": 4},
    "champion_before": {
        "version": "3",
        "data_dvc_md5": "aaaa.dir",
        "metrics": {"neg_elbo": 125.5, "kl": 10.0, "active_units": 3.0},
    },
    "register": {
        "decision": "champion",
        "reason": "95% CI upper bound -4.1 < -margin 0",
        "encoder_uri": "models:/digits-vae-encoder/4",
        "decoder_uri": "models:/digits-vae-decoder/4",
        "champion": {"encoder": "4", "decoder": "4"},
        "gate": {
            "n_examples": 369,
            "new_neg_elbo": 120.1,
            "champion_neg_elbo": 125.0,
            "mean_diff": -4.9,
            "ci_low": -5.6,
            "ci_high": -4.1,
            "confidence": 0.95,
        },
    },
    "where": {
        "champion_encoder": "models:/digits-vae-encoder@champion",
        "figures": "/x/outputs/evaluate",
    },
}


def test_report_shows_data_version_metrics_vs_champion_decision_and_links():
    md = render_report(COMPLETED)
    assert md.startswith("# Retrain: completed")
    assert "`9a16ec2d7beab68d83d3852f09b14cd1.dir` in `data.dvc`" in md
    assert "2b6c62fe" * 8 in md
    assert "| neg_elbo | 120.000 | 125.500 | -5.500 |" in md
    assert "| kl | 12.500 | 10.000 | +2.500 |" in md
    assert "-ELBO, paired gate (369 examples, 95% CI [-5.6000, -4.1000])" in md
    assert "| -4.9000 |" in md
    assert "**champion**: 95% CI upper bound" in md
    assert "`models:/digits-vae-encoder/4`" in md and "`run123`" in md
    assert "`models:/digits-vae-encoder@champion` = version 4" in md
    assert "champion: version 3" in md.lower()


def test_report_says_where_the_champions_embeddings_went_and_whether_dvc_lock_records_the_run():
    promoted = {
        **COMPLETED,
        "embed": {"output": "/r/outputs/embed/embeddings.parquet", "model_uri": "models:/e/4"},
        "dvc_lock": {"recorded": True, "file": "/r/dvc.lock"},
        "lock": "prefect global concurrency limit vae-retrain-digits-vae",
    }
    md = render_report(promoted)
    assert "| embeddings | `/r/outputs/embed/embeddings.parquet` by `models:/e/4` |" in md
    assert "| dvc.lock | updated (`dvc status` is clean) |" in md
    assert "| run guarded by | prefect global concurrency limit vae-retrain-digits-vae |" in md
    challenger = {
        **COMPLETED,
        "embed": {"skipped": "the new pair is a challenger"},
        "dvc_lock": {"recorded": False, "reason": "the run had overrides"},
    }
    md = render_report(challenger)
    assert "| embeddings | not written: the new pair is a challenger |" in md
    assert "| dvc.lock | not updated: the run had overrides |" in md


def test_report_of_a_failed_run_names_the_step_and_says_registration_was_not_reached():
    failed = {
        **COMPLETED,
        "status": "failed",
        "failed_step": "register",
        "error": "registry down",
        "register": None,
        "champion_before": None,
    }
    md = render_report(failed)
    assert "**Failed at `register`**: registry down" in md
    assert "Not reached" in md and "No champion before this run." in md
    assert "| neg_elbo | 120.000 | – | – |" in md


def test_report_says_why_data_was_not_versioned():
    data = {"versioned": False, "skipped_reason": "no DVC repo at or above /x (no .dvc/)"}
    md = render_report({"status": "completed", "data": data})
    assert "not versioned: no DVC repo at or above /x" in md


def test_shards_outside_any_dvc_repo_are_not_versioned_and_say_why(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    version = version_shards(shards, tmp_path)
    assert not version.versioned and "no DVC repo" in version.skipped_reason


def test_a_dvc_command_waits_for_the_repo_lock_held_by_another(tmp_path):
    repo = make_repo(tmp_path)
    result: dict = {}

    def second() -> None:
        started = time.monotonic()
        try:
            result["out"] = run_dvc(repo, "remote", "list", timeout=60)
        except Exception as exc:  # noqa: BLE001 - asserted below
            result["error"] = exc
        result["waited"] = time.monotonic() - started

    with dvc_lock(repo):
        worker = threading.Thread(target=second)
        worker.start()
        time.sleep(1.5)
        assert worker.is_alive(), "the DVC command ran while another held the repo lock"
    worker.join(60)
    assert "error" not in result and result["out"].startswith("local")
    assert result["waited"] >= 1.5


def test_two_concurrent_dvc_commands_in_one_repo_both_succeed(tmp_path):
    repo = make_repo(tmp_path)
    for name in ("a", "b"):
        (repo / name).mkdir()
        (repo / name / "x.txt").write_text(name)
    errors: list[Exception] = []

    def add(name: str) -> None:
        try:
            run_dvc(repo, "add", "--quiet", name)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert (repo / "a.dvc").is_file() and (repo / "b.dvc").is_file()


def test_lock_timeout_is_a_clear_error(tmp_path):
    repo = make_repo(tmp_path)
    with dvc_lock(repo), pytest.raises(DvcCommandError, match="another DVC command held"):
        run_dvc(repo, "remote", "list", timeout=0.2)


# -- prefect.yaml -----------------------------------------------------------------------------


def _deployment() -> dict:
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (dep,) = [d for d in config["deployments"] if d["name"] == "retrain-nightly"]
    return dep


def test_prefect_yaml_entrypoint_is_the_retrain_flow_and_its_parameters_validate():
    from prefect import Flow

    from pipelines.orchestration import flows

    dep = _deployment()
    path, name = dep["entrypoint"].split(":")
    assert (REPO / path).is_file() and path == "pipelines/orchestration/flows.py"
    flow = getattr(flows, name)
    assert isinstance(flow, Flow) and flow.name == "retrain"
    assert set(dep["parameters"]) <= set(inspect.signature(flow.fn).parameters)
    assert flow.validate_parameters(dep["parameters"]) == dep["parameters"]
    assert dep["work_pool"]["name"] == "vae-process-pool"


def test_prefect_yaml_cron_is_valid_and_matches_params_schedule():
    from prefect.client.schemas.schedules import CronSchedule

    (sched,) = _deployment()["schedules"]
    CronSchedule(cron=sched["cron"], timezone=sched["timezone"])
    params = load_params(REPO / "params.yaml")
    assert (sched["cron"], sched["timezone"]) == (params.schedule.cron, params.schedule.timezone)
    assert _deployment()["name"] == params.schedule.deployment


@pytest.mark.parametrize("override", ["schedule.cron=0 3 * *", "schedule.timezone=Mars/Base"])
def test_bad_schedule_params_are_refused_when_loading(override):
    with pytest.raises(ParamsError, match="schedule"):
        load_params(REPO / "params.yaml", [override])


def test_prefect_rejects_a_cron_that_only_looks_right():
    from pipelines.orchestration.scheduling import check_cron

    with pytest.raises(ParamsError, match="Invalid cron"):
        check_cron("0 25 * * *", "UTC")


# -- retries ----------------------------------------------------------------------------------


def test_only_tasks_safe_to_repeat_are_retried():
    from pipelines.orchestration import tasks as flows

    retries = {
        t.name: t.retries
        for t in (
            flows.stage_task,
            flows.version_task,
            flows.push_task,
            flows.train_task,
            flows.evaluate_task,
            flows.champion_task,
            flows.register_task,
            flows.embed_task,
            flows.record_task,
            flows.prune_task,
        )
    }
    assert retries == {
        "stage": 0,  # rewrites the shards
        "version-data": 0,
        "push-data": 3,  # content-addressed upload
        "train": 1,  # resumes from the latest checkpoint under the same run name
        "evaluate": 2,
        "read-champion": 2,
        "register": 0,  # would register a second pair
        "embed": 1,  # rewrites its own table whole
        "record-dvc-lock": 0,
        "prune": 1,
    }
    assert all(t.cache_policy is None for t in (flows.stage_task, flows.register_task))


def test_push_is_not_retried_without_a_remote_and_train_not_for_bad_params():
    from prefect.states import Failed

    from pipelines.orchestration.tasks import _retry_push, _retry_train

    assert not _retry_push(None, None, Failed(data=DvcCommandError("x", retryable=False)))
    assert _retry_push(None, None, Failed(data=DvcCommandError("remote timed out")))
    assert not _retry_train(None, None, Failed(data=ParamsError("bad")))
    assert _retry_train(None, None, Failed(data=RuntimeError("lost the Ray cluster")))
