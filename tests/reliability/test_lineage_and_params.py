"""Lineage that cannot lie, params that mean one thing, and one error boundary.

Through the `vae-pipeline` command line: each refusal is exit 2 and one `error:` line, and
leaves the files it was pointed at as they were.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipelines import cli
from pipelines.cli import main
from pipelines.data.versioning.lineage import data_version
from tests.helpers.params import WORKSPACE, overrides_in, params_in, set_args
from tests.registry.conftest import fit_model, write_stage_outputs
from tests.reliability.conftest import Workspace


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*argv, "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err.strip()


def _one_line(err: str) -> None:
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err


@pytest.fixture
def restaged(workspace: Workspace, tmp_path: Path) -> Workspace:
    """A copy of the workspace whose shards were re-staged with another split after training
    (its MLflow store is the copy's own, so nothing reaches the shared workspace)."""
    root = tmp_path / "copy"
    shutil.copytree(workspace.root, root, ignore=shutil.ignore_patterns("mlartifacts"))
    params = (root / "params.yaml").read_text().replace(str(workspace.root), str(root))
    (root / "params.yaml").write_text(params)
    copy = Workspace(root)
    code = main(["stage", "--params", str(copy.params_file), "--set", "data.test_fraction=0.3"])
    assert code == 0
    return copy


@pytest.mark.parametrize("command", ["evaluate", "register"])
def test_a_model_is_never_scored_on_shards_other_than_those_it_was_trained_on(
    restaged, command, capsys
):
    before = restaged.files()
    code, _, err = _run(capsys, command, "--params", str(restaged.params_file))
    assert code == 2, err
    _one_line(err)
    assert "was trained on data version" in err and "vae-pipeline train" in err
    assert restaged.files() == before


def test_train_refuses_shards_that_are_not_the_version_data_dvc_records(restaged, capsys):
    before = restaged.files()
    code, _, err = _run(capsys, "train", "--params", str(restaged.params_file))
    assert code == 2, err
    _one_line(err)
    # The paths DVC takes from the project folder: data/shards, not the folder's bare name.
    assert "'dvc checkout data.dvc'" in err and "'dvc add data/shards'" in err, err
    assert restaged.files() == before


def test_the_recorded_data_version_is_computed_from_the_shards_used(workspace, tmp_path):
    tracked = data_version(workspace.root, workspace.shards)
    recorded = yaml.safe_load((workspace.root / "data.dvc").read_text())["outs"][0]["md5"]
    assert tracked["dvc_md5"] == recorded
    # The same shards elsewhere (no .dvc file tracks them) and one shard fewer: the version
    # recorded is that of the files, not whatever data.dvc says.
    other = tmp_path / "shards"
    shutil.copytree(workspace.shards, other)
    sorted(other.glob("val-*.tar.gz"))[-1].unlink()
    assert data_version(workspace.root, other)["dvc_md5"] != recorded


def test_the_data_version_of_a_folder_holding_what_its_manifest_lists_reads_no_shard(
    workspace, tmp_path, monkeypatch
):
    """At 10^7 images a run must not read every shard once more to name its data version:
    a folder holding exactly the manifest's shards, at their sizes, is named from the
    manifest (the loader checks each shard's SHA-256 as it reads it). Anything else there
    and the files are hashed, so the version is still that of the files."""
    from pipelines.data.versioning import lineage
    from pipelines.data.versioning.hashing import dvc_dir_md5

    recorded = yaml.safe_load((workspace.root / "data.dvc").read_text())["outs"][0]["md5"]
    other = tmp_path / "shards"
    shutil.copytree(workspace.shards, other)
    hashed = []  # folders whose files were hashed (by DVC's tree builder) to name them
    monkeypatch.setattr(lineage, "dvc_dir_md5", lambda f: hashed.append(f) or dvc_dir_md5(f))
    assert data_version(workspace.root, other)["dvc_md5"] == recorded
    assert hashed == [], "a shard was read to name the data version"

    (other / "notes.txt").write_text("mine")
    assert data_version(workspace.root, other)["dvc_md5"] == dvc_dir_md5(other) != recorded
    assert hashed == [other], "a folder holding more than the manifest lists is hashed"


def test_gate_does_not_compare_with_a_champion_trained_under_another_split(tmp_path, capsys):
    """After a re-staged split, the champion may have trained on today's test examples: the
    new pair is a challenger with the reason named, and the champion stays."""
    root = tmp_path / "ws"
    args = ["--params", str(root / "params.yaml")]
    args += set_args(overrides_in(root, *WORKSPACE, data=root / "data"))
    for fraction, label in ((0.2, "first"), (0.3, "second")):
        split = f"data.test_fraction={fraction}"
        params = params_in(root, *WORKSPACE, split, data=root / "data", own_root=True)
        assert main(["stage", *args, "--set", split, "--quiet"]) == 0
        write_stage_outputs(params, fit_model(params, epochs=1), label)
        code, out, err = _run(capsys, "register", *args, "--set", split, "--json")
        assert code == 0, err
    result = json.loads(out)
    assert result["decision"] == "challenger"
    assert "trained with split val_fraction=0.1,test_fraction=0.2" in result["reason"]
    assert result["champion"]["encoder"] == "1"


# -- params --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("train:\n  epochs: 3\ntrain:\n  lr: 0.1\n", "'train' appears twice"),
        ("train:\n  epochs: 3\n  epochs: 4\n", "'epochs' appears twice"),
        ("1: x\n", "key 1 is not a name"),
        ("data:\n  ? [a, b]\n  : 1\n", "is not a name"),
        ("train:\n  null: 3\n", "key None is not a name"),
        ("- data\n- model\n", "mapping of sections"),
        ("train: [1, 2]\n", "train"),
        ("train:\n  lr: .nan\n", "train.lr"),
        ("train:\n  lr: -0.1\n", "train.lr"),
        ("model:\n  hidden: [100000000]\n", "model.hidden"),
        ("evaluate:\n  iw_k: 100000000\n", "evaluate.iw_k"),
        ("outputs_dir: .\n", "outputs_dir"),
        ("outputs_dir: ..\n", "outputs_dir"),
        ("cluster:\n  storage_path: ''\n", "cluster.storage_path"),
        ("train:\n  num_workers: 4\n", "train.num_workers is now cluster.num_workers"),
        ("data:\n  shards_dir: ''\n", "data.shards_dir"),
        ("\xff\xfe bad bytes", "params"),
    ],
)
def test_a_params_file_that_can_mean_two_things_is_refused(tmp_path, capsys, text, names):
    path = tmp_path / "params.yaml"
    path.write_bytes(text.encode("latin-1"))
    code, _, err = _run(capsys, "train", "--params", str(path))
    assert code == 2, err
    _one_line(err)
    assert names in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_model_too_large_to_train_is_refused_before_anything_is_allocated(workspace, capsys):
    code, _, err = _run(
        capsys, "train", "--params", str(workspace.params_file),
        "--set", "model.hidden=[60000, 60000]",
    )  # fmt: skip
    assert code == 2, err
    _one_line(err)
    assert "weights" in err and "model.hidden" in err


def test_commands_from_a_subfolder_use_the_nearest_params_file_and_say_so(
    workspace, monkeypatch, capsys
):
    sub = workspace.root / "data"
    monkeypatch.chdir(sub)
    before = workspace.files()
    capsys.readouterr()
    code = main(["similar", "nope", "--json"])  # reads only: fails on the missing key
    out, err = capsys.readouterr()
    assert code == 2
    assert f"params: {workspace.params_file}" in err
    assert json.loads(out)["exit_code"] == 2
    assert workspace.files() == before
    assert not (sub / "outputs").exists() and not (sub / "mlflow.db").exists()


def test_without_any_params_file_the_defaults_are_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    main(["similar", "nope", "--embeddings", str(tmp_path / "none.parquet")])
    assert "params: none found" in capsys.readouterr().err


# -- the error boundary --------------------------------------------------------------------


def test_usage_errors_are_one_line_and_json_with_json(capsys):
    code, out, err = _run(capsys, "train", "--no-such-flag", "--json")
    assert code == 2
    _one_line(err)
    assert json.loads(out) == {"error": err.removeprefix("error: "), "exit_code": 2}


def test_an_unexpected_error_is_one_bug_line_with_a_log_holding_the_traceback(monkeypatch, capsys):
    def broken(args, params):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(cli, "cmd_similar", broken)
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_handler(parser(), "similar", broken))
    code, out, err = _run(capsys, "similar", "k", "--json")
    assert code == cli.EXIT_BUG
    _one_line(err)
    assert "unexpected ZeroDivisionError" in err and "this is a bug" in err
    log = Path(json.loads(out)["log"])
    assert "Traceback" in log.read_text() and "ZeroDivisionError" in log.read_text()


def _with_handler(parser, command: str, handler):
    for action in parser._subparsers._group_actions:
        action.choices[command].set_defaults(handler=handler)
    return parser
