"""Scheduled retraining as a platform team runs it: a `prefect server`, a process work pool,
two `prefect worker`s, the committed prefect.yaml deployed from two checkouts (two teams, or
two machines, registering the same model into one `mlflow server`), and two runs triggered at
the same moment.

What must hold: both runs complete through the workers (stage, DVC version and push, train,
evaluate, register); the server's global concurrency limit runs them one after the other
(their task runs do not overlap in time); there is exactly one champion pair and both runs'
versions are recorded; each promotion embeds with the new encoder and a challenger embeds
nothing; `similar` reads the champion's table and refuses an older encoder's; a run whose
settings all live in params.yaml leaves `dvc status` clean (dvc.lock records it), and `dvc
repro` there runs train, evaluate and register once a code dep of train changes, then nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import mlflow
import pytest
import requests
import yaml

from pipelines.params_file import apply_override
from tests.helpers.params import FLOW, REPO, overrides_in, set_args
from tests.helpers.repos import git_dvc_env, make_repo, sh
from tests.orchestration.conftest import BIN, prefect_env, start
from tests.orchestration.test_served_deployment import TERMINAL, _get, trigger_run
from tests.servers import mlflow_server, stop_process_group

pytestmark = pytest.mark.slow

POOL = "vae-process-pool"
MODEL = "digits-vae"


def _checkout(tmp: Path, team: str, tracking: str) -> Path:
    """A repo with the committed prefect.yaml, its deployment renamed per team and pointed at
    tiny settings and the shared tracking server."""
    repo = make_repo(tmp / team)
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (deployment,) = spec["deployments"]
    deployment["name"] = f"retrain-{team}"
    overrides = overrides_in(repo, *FLOW, f"mlflow.tracking_uri={tracking}", data=repo / "data")
    # One embedding actor: 1,797 digits need no second (each Ray Data actor is a process that
    # loads torch and the model, seconds of CPU per promotion).
    overrides += ["embed.on_promotion=true", "embed.concurrency=1"]
    if team == "a":
        # Team a keeps its settings in params.yaml and the code dvc.yaml lists in the repo, as
        # a real checkout does, so its run can be recorded in dvc.lock.
        tree = yaml.safe_load((repo / "params.yaml").read_text())
        for assignment in overrides:
            apply_override(tree, assignment)
        (repo / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
        for code in ("pipelines", "vae"):
            shutil.copytree(REPO / code, repo / code, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPO / ".dvcignore", repo / ".dvcignore")
        overrides = []
    else:
        (repo / "pipelines").symlink_to(REPO / "pipelines")  # the entrypoint, read-only
        overrides += ["train.seed=1", "train.epochs=1"]  # another model, not a re-run of a's
    deployment["parameters"]["overrides"] = overrides
    (repo / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return repo


def _prefect(env: dict, cwd: Path, *cmd: str) -> None:
    proc = subprocess.run([str(BIN / "prefect"), *cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0, f"prefect {' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"


def _span(api: str, run_id: str) -> tuple[datetime, datetime]:
    """When a flow run's first task started and its last one ended."""
    query = {"task_runs": {"flow_run_id": {"any_": [run_id]}}}
    tasks = requests.post(f"{api}/task_runs/filter", json=query, timeout=30).json()
    starts = [datetime.fromisoformat(t["start_time"]) for t in tasks if t["start_time"]]
    ends = [datetime.fromisoformat(t["end_time"]) for t in tasks if t["end_time"]]
    assert starts and ends, tasks
    return min(starts), max(ends)


def _wait(api: str, runs: list[str], workers: list, logs: list[Path], timeout: float) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc, log in zip(workers, logs, strict=True):
            assert proc.poll() is None, f"a worker exited:\n{log.read_text()[-4000:]}"
        states = [(_get(f"{api}/flow_runs/{r}") or {}).get("state") or {} for r in runs]
        if all(s.get("type") in TERMINAL for s in states):
            return [s["type"] for s in states]
        time.sleep(2)
    tails = "\n".join(log.read_text()[-3000:] for log in logs)
    raise AssertionError(f"flow runs not finished after {timeout}s; workers:\n{tails}")


def test_two_workers_two_deployments_one_champion_and_downstream_follows_it(
    prefect_server,
    tmp_path,
):
    api, home = prefect_server
    env = prefect_env(home, api)
    with mlflow_server(tmp_path / "mlflow") as tracking:
        repos = {team: _checkout(tmp_path, team, tracking) for team in ("a", "b")}
        _prefect(env, tmp_path, "work-pool", "create", POOL, "--type", "process")
        for repo in repos.values():
            _prefect(env, repo, "--no-prompt", "deploy", "--all")
        deployments = {t: _get(f"{api}/deployments/name/retrain/retrain-{t}") for t in repos}
        for d in deployments.values():  # the committed schedule, on the pool
            assert d["work_pool_name"] == POOL
            assert d["schedules"][0]["schedule"]["cron"] == "0 3 * * *"

        logs = [tmp_path / f"worker-{i}.log" for i in (1, 2)]
        workers = [
            start(
                [
                    str(BIN / "prefect"),
                    "worker",
                    "start",
                    "--pool",
                    POOL,
                    "--limit",
                    "1",
                    "--name",
                    f"worker-{i}",
                ],
                env,
                tmp_path,
                log,
            )  # fmt: skip
            for i, log in zip((1, 2), logs, strict=True)
        ]
        try:
            runs = {t: trigger_run(api, d["id"]) for t, d in deployments.items()}
            states = _wait(api, list(runs.values()), workers, logs, timeout=600)
        finally:
            for proc in workers:
                stop_process_group(proc)
        assert states == ["COMPLETED", "COMPLETED"], "\n".join(
            log.read_text()[-4000:] for log in logs
        )
        _check_one_after_the_other(api, runs)
        # Team a's run is what `dvc repro` would have left; team b's overrides are not in its
        # params.yaml, so its dvc.lock is left alone rather than made to lie.
        status = sh(repos["a"], git_dvc_env(), "dvc", "status", "--json")
        assert json.loads(status) == {}, status
        assert "train" in yaml.safe_load((repos["a"] / "dvc.lock").read_text())["stages"]
        assert not (repos["b"] / "dvc.lock").exists()
        _check_registry_and_downstream(api, tracking, repos, env)
        _check_dvc_repro_reruns_what_changed_then_nothing(repos["a"])


def _dvc_repro(repo: Path) -> str:
    proc = subprocess.run(["dvc", "repro"], cwd=repo, env=git_dvc_env(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, f"dvc repro:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _check_dvc_repro_reruns_what_changed_then_nothing(repo: Path) -> None:
    """`dvc repro` in the checkout whose run dvc.lock records: a changed code dep of train
    runs train (its finished run is reused: no Ray), evaluate and register through dvc.yaml's
    commands; a second repro with nothing changed runs no stage."""
    code = repo / "pipelines" / "training" / "progress.py"
    code.write_text(code.read_text() + "# a change dvc.yaml's train stage depends on\n")
    first = _dvc_repro(repo)
    for stage in ("train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first, first
    assert "Stage 'stage' didn't change, skipping" in first, first
    trained = json.loads((repo / "outputs" / "train" / "train_result.json").read_text())
    # The finished run re-exported, not trained again: it "started" at its last epoch.
    assert trained["started_at_epoch"] == trained["epochs_run"] == 2, trained
    register = json.loads((repo / "outputs" / "register" / "register.json").read_text())
    assert register["decision"] == "unchanged", register  # the same weights: no new version
    second = _dvc_repro(repo)
    assert "Running stage" not in second, second
    for stage in ("stage", "train", "evaluate", "register"):
        assert f"Stage '{stage}' didn't change, skipping" in second, second


def _check_one_after_the_other(api: str, runs: dict[str, str]) -> None:
    (first_start, first_end), (second_start, second_end) = sorted(
        _span(api, r) for r in runs.values()
    )
    assert first_end <= second_start, "the server's limit let two retrains overlap"
    limits = requests.post(f"{api}/v2/concurrency_limits/filter", json={}, timeout=30).json()
    names = {limit["name"]: limit["limit"] for limit in limits}
    assert names.get(f"vae-retrain-{MODEL}") == 1 and names.get(f"vae-register-{MODEL}") == 1


def _check_registry_and_downstream(api, tracking: str, repos: dict, env: dict) -> None:
    client = mlflow.MlflowClient(tracking)
    encoders = client.search_model_versions(f"name='{MODEL}-encoder'")
    assert len(encoders) == 2, "both runs recorded"
    champion = client.get_model_version_by_alias(f"{MODEL}-encoder", "champion")
    decoder = client.get_model_version_by_alias(f"{MODEL}-decoder", "champion")
    assert champion.run_id == decoder.run_id, "one champion pair"
    for repo in repos.values():
        assert (repo / "data.dvc").is_file() and any((repo / ".dvc-remote").rglob("*.dir"))

    tables = {}
    for team, repo in repos.items():
        (version,) = [v for v in encoders if v.run_id == _run_of(client, repo)]
        table = repo / "outputs" / "embed" / "embeddings.parquet"
        if version.tags["gate.decision"] == "challenger":
            assert not table.exists(), "a challenger embeds nothing"
            continue
        sidecar = json.loads(table.with_suffix(".json").read_text())
        assert sidecar["model_uri"] == f"models:/{MODEL}-encoder/{version.version}"
        tables[team] = (repo, version.version)
    assert tables, "the first run promotes"

    for repo, version in tables.values():
        out = _similar(repo, tracking, env)
        if version == champion.version:
            assert out["encoder"] == f"models:/{MODEL}-encoder/{version}", out
        else:  # promoted first, then overtaken: its table is now an older encoder's
            assert "older than the champion" in out["error"], out


def _run_of(client, repo: Path) -> str:
    return json.loads((repo / "outputs" / "train" / "train_result.json").read_text())[
        "mlflow_run_id"
    ]


def _similar(repo: Path, tracking: str, env: dict) -> dict:
    sets = set_args(overrides_in(repo, *FLOW, data=repo / "data"))
    argv = [str(BIN / "vae-pipeline"), "similar", "digits-00000", "-k", "3", "--json",
            "--quiet", "--params", str(repo / "params.yaml"), *sets,
            "--set", f"mlflow.tracking_uri={tracking}"]  # fmt: skip
    proc = subprocess.run(argv, cwd=repo, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    return json.loads(proc.stdout)
