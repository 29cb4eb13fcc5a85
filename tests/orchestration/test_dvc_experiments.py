"""DVC experiments as DVC users expect them (docs/experiments.md): `dvc exp run -S`, a queued
experiment, `dvc exp show`'s metrics and params, `dvc exp apply`, and what each does to MLflow
and to params.yaml. The pure decisions are unit tests; one slow test runs it all with real
`dvc` in a temporary git repo."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipelines import tracking
from pipelines.cli import main
from pipelines.errors import PipelineError
from pipelines.guards import check_not_workspace
from pipelines.params import MlflowParams
from pipelines.registry.register_job import NOT_REGISTERED, RegisterJob, experiment_skip_reason
from tests.helpers.params import REPO, SMALL_MODEL, overrides_in, params_in, set_args
from tests.helpers.repos import git_dvc_env, make_repo

# -- where a queued experiment's MLflow run goes ----------------------------------------------


def test_the_embedded_store_of_a_queued_experiments_copy_is_the_repository_it_came_from(
    tmp_path, monkeypatch
):
    """DVC runs a queued experiment in <repo>/.dvc/tmp/exps/<tmp> and sets DVC_ROOT to <repo>:
    the default store is <repo>/mlflow.db, the one a plain `dvc exp run` logs to."""
    repo = tmp_path / "repo"
    copy = repo / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    copy.mkdir(parents=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    queued = tracking.store(MlflowParams(), copy)
    assert queued.uri == f"sqlite:///{repo.resolve() / 'mlflow.db'}"
    assert queued.artifact_location == (repo.resolve() / "mlartifacts").as_uri()
    assert queued.default_db == repo.resolve() / "mlflow.db"
    # A plain `dvc exp run` (DVC_ROOT is the workspace), another repo's DVC_ROOT, or none.
    for dvc_root in (str(repo), str(tmp_path / "other"), None):
        if dvc_root is None:
            monkeypatch.delenv("DVC_ROOT")
        else:
            monkeypatch.setenv("DVC_ROOT", dvc_root)
        assert tracking.store(MlflowParams(), repo).default_db == repo.resolve() / "mlflow.db"
    named = tracking.store(MlflowParams(tracking_uri="sqlite:///x.db"), copy)
    assert named.uri == f"sqlite:///{copy / 'x.db'}", "a store the user named is theirs"


def test_outputs_inside_a_workspace_that_dvc_copied_under_dot_dvc_are_allowed(tmp_path):
    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    check_not_workspace(copy / "outputs", copy, "outputs_dir")
    check_not_workspace(copy / "runs", copy, "cluster.storage_path")
    with pytest.raises(PipelineError, match=r"inside a repository's own \.dvc folder"):
        check_not_workspace(copy / ".dvc" / "outputs", copy, "outputs_dir")
    with pytest.raises(PipelineError, match=r"inside a repository's own \.git folder"):
        check_not_workspace(tmp_path / "repo" / ".git" / "x", copy, "outputs_dir")


def _stage_outputs() -> dict[str, bool]:
    """Every output dvc.yaml declares (outs, metrics, plots) -> whether DVC caches it."""
    found: dict[str, bool] = {}
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path, spec = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
                found[path] = (spec or {}).get("cache", True)
    return found


def test_git_tracks_exactly_the_outputs_dvc_does_not_cache():
    """An experiment's commit holds what git tracks and what DVC caches: a `cache: false`
    output (the metrics `dvc exp show` reads, the records) must not be git-ignored, and a
    cached one (the model, the figures) must be, as DVC would make it."""
    outputs = _stage_outputs()
    assert outputs["outputs/evaluate/scores.json"] is False
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", "--stdin"], cwd=REPO, input="\n".join(outputs),
        capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    assert sorted(p for p, cached in outputs.items() if cached) == sorted(ignored)


# -- whether an experiment registers -----------------------------------------------------------


def _job(small_params, experiment: str | None, *overrides: str) -> RegisterJob:
    job = RegisterJob.from_params(small_params(*overrides))
    return dataclasses.replace(job, experiment=experiment)


def test_only_a_dvc_experiment_with_in_experiments_false_skips_registering(small_params):
    assert experiment_skip_reason(_job(small_params, None)) is None
    on = _job(small_params, "lucky-beta", "register.in_experiments=true")
    assert experiment_skip_reason(on) is None
    why = experiment_skip_reason(_job(small_params, "lucky-beta"))
    assert "lucky-beta" in why and "register.in_experiments" in why
    assert "`dvc exp apply lucky-beta` then `dvc repro --force --single-item register`" in why


def test_the_experiment_is_read_from_dvcs_environment_once_at_the_jobs_edge(
    small_params, monkeypatch
):
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-beta")
    assert RegisterJob.from_params(small_params()).experiment == "lucky-beta"
    monkeypatch.setenv("DVC_EXP_NAME", "")
    assert RegisterJob.from_params(small_params()).experiment is None


def test_an_experiment_that_does_not_register_records_why_and_never_opens_the_registry(
    tmp_path, monkeypatch, capsys
):
    """`vae-pipeline register --json` as dvc.yaml runs it in an experiment: one JSON document,
    and register.json, the stage's DVC out, names the training run and how to register it; no
    MLflow store is created or read (a test split is not even scored)."""
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-beta")
    overrides = overrides_in(tmp_path)
    job = RegisterJob.from_params(params_in(tmp_path))
    job.train_dir.mkdir(parents=True)
    (job.train_dir / "train_result.json").write_text(json.dumps({"mlflow_run_id": "r1"}))
    job.evaluate_dir.mkdir(parents=True)
    (job.evaluate_dir / "metrics.json").write_text(json.dumps({"neg_elbo": 30.0}))
    assert main(["register", "--json", "--quiet", *set_args(overrides)]) == 0
    printed = json.loads(capsys.readouterr().out)
    record = json.loads((job.register_dir / "register.json").read_text())
    assert printed["decision"] == record["decision"] == NOT_REGISTERED
    assert record["mlflow_run_id"] == "r1" and record["encoder_uri"] is None
    assert "dvc exp apply lucky-beta" in record["reason"]
    assert not (tmp_path / "mlflow.db").exists()


# -- params.yaml through DVC's own `-S` ----------------------------------------------------


def _comments(text: str) -> list[str]:
    return [c.strip() for c in re.findall(r"#[^\n]*", text)]


def test_dvcs_set_param_keeps_values_and_comments_but_not_the_flow_lists_or_nulls(tmp_path):
    """What docs/experiments.md says `dvc exp run -S` does to params.yaml, measured with the
    function DVC calls for it (dvc.utils.hydra.apply_overrides, DVC 3)."""
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    before = params.read_text()
    apply_overrides(params, ["train.epochs=2"])
    after = params.read_text()
    want = yaml.safe_load(before)
    want["train"]["epochs"] = 2
    assert yaml.safe_load(after) == want, "every other value as it was"
    assert _comments(after) == _comments(before), "every comment kept, in order"
    assert "image_size: [8, 8]" in before and re.search(
        r"\n  image_size: +#.*\n  - 8\n  - 8", after
    )
    assert "  size: null" in before and re.search(r"\n  size: +# sprites", after)
    assert "noise: {gaussian_std: 0.0, mask_prob: 0.0}" in after, "flow mappings stay"


# -- the real thing: dvc exp run, --queue, show and apply --------------------------------------

# Baked into the repo's params.yaml as written (its layout is what DVC's rewrite is checked
# against): one worker, one epoch, a small model, cheap scoring.
EXPERIMENT = {
    **dict(o.split("=", 1) for o in SMALL_MODEL),
    "train.epochs": "1",
    "cluster.num_workers": "1",
    "evaluate.iw_k": "5",
    "evaluate.iw_examples": "100",
    "register.bootstrap_samples": "100",
    "register.mc_samples": "1",
}


def _bake(text: str, settings: dict[str, str]) -> str:
    """params.yaml's text with each section.key's value replaced in its own line, comments
    and layout untouched."""
    for dotted, value in settings.items():
        section, key = dotted.split(".")
        line = re.compile(
            rf"(^{section}:.*\n(?:(?:  .*|\s*)\n)*?  {key}: *)([^#\n]*?)( *#.*)?$", re.M
        )
        text, n = line.subn(lambda m, v=value: f"{m[1]}{v}{m[3] or ''}", text, count=1)
        assert n == 1, dotted
    return text


@pytest.fixture
def exp_repo(tmp_path) -> tuple[Path, dict]:
    """Our pipeline in a fresh git repo, committed with the small settings and the `stage`
    stage already run (the README's first data command), so that each experiment trains."""
    repo = make_repo(tmp_path)
    for name in ("pipelines", "vae"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in (".gitignore", ".dvcignore", "data/.gitignore", "data/stage.json"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, repo / name)
    params = repo / "params.yaml"
    params.write_text(_bake(params.read_text(), EXPERIMENT))
    # The store every experiment must log to, migrated here once (tests/conftest.py) rather
    # than by each stage's process.
    tracking.client(_workspace_store(repo)).search_experiments()
    drop = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME")
    env = {k: v for k, v in git_dvc_env().items() if k not in drop}
    _sh(repo, env, "git", "add", "-A")
    _sh(repo, env, "git", "commit", "-qm", "pipeline")
    _sh(repo, env, "dvc", "repro", "stage")
    _sh(repo, env, "git", "add", "dvc.lock", "data.dvc", "data/stage.json")
    _sh(repo, env, "git", "commit", "-qm", "data")
    return repo, env


def _workspace_store(repo: Path) -> tracking.Store:
    """The stages' embedded default store, named outright: this process's own
    $MLFLOW_TRACKING_URI may be set by another test that ran in it (mlflow.set_tracking_uri
    exports it), and the stages run without it."""
    return tracking.store(
        MlflowParams(tracking_uri=f"sqlite:///{repo.resolve() / 'mlflow.db'}"), repo
    )


def _sh(repo: Path, env: dict, *cmd: str) -> str:
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _experiments(repo: Path, env: dict) -> dict[str, dict]:
    """`dvc exp show --json`'s experiments of HEAD: name -> their data (params, metrics)."""
    shown = json.loads(_sh(repo, env, "dvc", "exp", "show", "--json", "--no-pager"))
    (head,) = [row for row in shown if row["rev"] != "workspace"]
    return {rev["name"]: rev["data"] for exp in head["experiments"] for rev in exp["revs"]}


@pytest.mark.slow
def test_dvc_experiments_run_queue_show_and_apply_with_one_mlflow_store(exp_repo):
    """`dvc exp run -S` and a queued experiment (`dvc queue start`, run by DVC in a temporary
    copy of the repo) each show their test metrics and params in `dvc exp show`, log one MLflow
    run tagged with their name into the workspace's own store, and register nothing;
    params.yaml keeps its values and comments; `dvc exp apply` brings an experiment's params
    and metrics back, and `dvc repro --force --single-item register` then registers it."""
    repo, env = exp_repo
    params, before = repo / "params.yaml", (repo / "params.yaml").read_text()
    ran = _sh(repo, env, "dvc", "exp", "run", "-S", "train.epochs=2")
    (plain,) = re.findall(r"Ran experiment\(s\): (\S+)", ran)
    want = yaml.safe_load(before)
    want["train"]["epochs"] = 2
    assert yaml.safe_load(params.read_text()) == want
    assert _comments(params.read_text()) == _comments(before)

    _sh(repo, env, "dvc", "exp", "run", "--queue", "-S", "train.epochs=3", "-n", "queued")
    # Its worker inherits the pipes, so this returns once the worker has run the queue and
    # stopped (no process is left behind); `logs --follow` is how a user waits for it.
    _sh(repo, env, "dvc", "queue", "start")
    _sh(repo, env, "dvc", "queue", "logs", "--follow", "queued")
    assert "Success" in _sh(repo, env, "dvc", "queue", "status")
    shown = _experiments(repo, env)
    for name, epochs in ((plain, 2), ("queued", 3)):
        assert shown[name]["params"]["params.yaml"]["data"]["train"]["epochs"] == epochs
        scores = shown[name]["metrics"]["outputs/evaluate/scores.json"]["data"]
        assert {"neg_elbo", "recon_nll", "kl", "iw_nll"} <= set(scores), shown[name]
    assert shown[plain]["metrics"] != shown["queued"]["metrics"]

    store = _workspace_store(repo)
    client = tracking.client(store)
    runs = client.search_runs([tracking.experiment_id(store)], "")
    assert sorted(r.data.tags.get("dvc.experiment") for r in runs) == sorted([plain, "queued"])
    assert client.search_registered_models() == [], "experiments register nothing by default"
    assert not list((repo / ".dvc").rglob("mlflow.db")), "no store left in DVC's temp copy"

    _sh(repo, env, "dvc", "exp", "apply", "queued")
    assert yaml.safe_load(params.read_text())["train"]["epochs"] == 3
    scores = json.loads((repo / "outputs" / "evaluate" / "scores.json").read_text())
    assert scores == shown["queued"]["metrics"]["outputs/evaluate/scores.json"]["data"]
    register = json.loads((repo / "outputs" / "register" / "register.json").read_text())
    assert register["decision"] == NOT_REGISTERED and "dvc exp apply" in register["reason"]
    assert "up to date" in _sh(repo, env, "dvc", "status")

    _sh(repo, env, "dvc", "repro", "--force", "--single-item", "register")
    register = json.loads((repo / "outputs" / "register" / "register.json").read_text())
    (queued_run,) = [r for r in runs if r.data.tags["dvc.experiment"] == "queued"]
    assert (
        register["decision"] == "champion" and register["mlflow_run_id"] == queued_run.info.run_id
    )
