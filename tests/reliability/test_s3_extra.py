"""s3fs and dvc-s3 are the `s3` extra: an s3:// location without them is one line that names
the extra, said before any stage, Ray or Prefect starts. The packages are made missing here by
a None in sys.modules (what Python's import system reads as "not installed"): this tests our
own check, not S3; the object-store tests run the real thing under the dev install."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.data.versioning.dvc import DvcCommandError, check_remote_extra
from pipelines.errors import ParamsError, PipelineError
from pipelines.params_file import load_params
from pipelines.storage import S3_EXTRA, location, s3_extra_missing

LINE = "s3:// needs the s3 extra: pip install 'vae-pipeline[s3]'"


@pytest.fixture
def without_s3fs(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)


@pytest.fixture
def without_dvc_s3(monkeypatch):
    monkeypatch.setitem(sys.modules, "dvc_s3", None)


def dvc_repo_with_remote(folder: Path, url: str) -> Path:
    """A repo as `dvc init` and `dvc remote add -d storage URL` leave its config: all that
    the check reads (no DVC command runs)."""
    (folder / ".dvc").mkdir(parents=True)
    (folder / ".dvc" / "config").write_text(
        f"[core]\n    remote = storage\n['remote \"storage\"']\n    url = {url}\n"
    )
    return folder


@pytest.fixture
def s3_remote_params(tmp_path) -> Path:
    """The params file of a project whose DVC remote is on S3."""
    repo = dvc_repo_with_remote(tmp_path, "s3://bucket/vae")
    (repo / "params.yaml").write_text("train:\n  epochs: 1\n")
    return repo / "params.yaml"


def test_the_dev_install_has_the_s3_extra():
    assert S3_EXTRA == LINE
    assert not s3_extra_missing() and not s3_extra_missing("dvc_s3")


@pytest.mark.parametrize(
    "override",
    ["data.shards_dir=s3://bucket/shards", "cluster.storage_path=s3://bucket/runs",
     "embed.output=s3a://bucket/embeddings.parquet"],
)  # fmt: skip
def test_an_s3_url_in_params_without_s3fs_names_the_extra(without_s3fs, override):
    with pytest.raises(ParamsError, match=r"vae-pipeline\[s3\]"):
        load_params(None, [override])


def test_the_cli_says_it_in_one_line_with_exit_code_2(without_s3fs, capsys):
    code = main(["quickstart", "--quiet", "--set", "data.shards_dir=s3://bucket/shards"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    assert LINE in err, err


def test_an_s3_path_no_params_check_saw_fails_at_its_first_use(without_s3fs):
    with pytest.raises(PipelineError, match=r"^s3:// needs the s3 extra"):
        location("s3://bucket/source")
    assert str(location("memory://bucket/source")) == "memory://bucket/source"
    assert location("data/shards", Path("/work")) == Path("/work/data/shards")


def test_an_s3_dvc_remote_without_dvc_s3_is_refused_before_staging(tmp_path, without_dvc_s3):
    repo = dvc_repo_with_remote(tmp_path, "s3://bucket/vae")
    with pytest.raises(DvcCommandError, match=r"DVC remote is on S3; s3:// needs") as info:
        check_remote_extra(repo)
    assert not info.value.retryable, "the push task must not retry what only an install fixes"
    check_remote_extra(dvc_repo_with_remote(tmp_path / "local", "/srv/dvc-store"))


def test_an_s3_dvc_remote_with_dvc_s3_installed_passes_the_check(tmp_path):
    check_remote_extra(dvc_repo_with_remote(tmp_path, "s3://bucket/vae"))


def test_retrain_refuses_an_s3_remote_before_prefect_starts(
    s3_remote_params, without_dvc_s3, capsys
):
    import pipelines.orchestration.prefect_api as prefect_api

    def no_server():
        raise PipelineError("reached Prefect's server")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prefect_api, "prefect_server", no_server)
        code = main(["retrain", "--quiet", "--params", str(s3_remote_params)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and LINE in err and "Prefect" not in err, err
    # --no-push pushes nothing: no remote to check, so the run goes on to Prefect.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prefect_api, "prefect_server", no_server)
        code = main(["retrain", "--quiet", "--no-push", "--params", str(s3_remote_params)])
    assert code == 2 and "reached Prefect's server" in capsys.readouterr().err


def test_a_deployed_flow_checks_the_remote_before_its_first_task(s3_remote_params, without_dvc_s3):
    """A scheduled run (`serve`) enters the flow without the CLI's check."""
    from pipelines.orchestration.flows import retrain_flow

    with pytest.raises(DvcCommandError, match=r"vae-pipeline\[s3\]"):
        retrain_flow.fn(params_file=str(s3_remote_params), push=True)


def test_serve_refuses_an_s3_remote_before_it_serves(s3_remote_params, without_dvc_s3, capsys):
    import pipelines.orchestration.scheduling as scheduling

    def no_serve(*args, **kwargs):
        raise PipelineError("served the deployment")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scheduling, "serve_retrain", no_serve)
        code = main(["serve", "--quiet", "--params", str(s3_remote_params)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and LINE in err and "served" not in err, err
