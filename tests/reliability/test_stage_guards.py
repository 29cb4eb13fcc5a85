"""Staging may replace only shards it wrote, interrupts leave nothing behind, and a manifest
that lacks a field fails in one line.

- data.shards_dir pointing at the project, one of its parents, a user's folder or a file is
  refused before any data is loaded, with the workspace byte-identical.
- SIGTERM during `vae-pipeline stage` (what `timeout`, CI and Prefect cancellation send) exits
  143 with one line, no staging folder and the previous shards byte-identical; what a SIGKILL
  leaves is removed by the next run.
- Every field of manifest.json that train and evaluate read is checked by the schema.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli import main
from pipelines.data.staging import remove_leftovers
from tests.helpers.files import tree_hashes
from tests.helpers.params import REPO
from tests.reliability.conftest import Workspace

FIX = "re-run 'vae-pipeline stage' or 'dvc pull'"


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main([*argv, "--quiet"])
    return code, capsys.readouterr().err.strip()


def assert_one_line(code: int, err: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err and "unexpected" not in err, err


# -- 1. the shards folder ----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    id: str
    value: Callable[[Workspace, Path], str]  # (workspace, scratch) -> data.shards_dir
    names: str  # the error line must contain this


def _scratch_folder(files: dict[str, str]) -> Callable[[Workspace, Path], str]:
    def value(ws: Workspace, tmp: Path) -> str:
        folder = tmp / "folder"
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
        return str(folder)

    return value


def _our_shards_plus(name: str) -> Callable[[Workspace, Path], str]:
    """A copy of the workspace's valid shards folder with a stranger's file beside them."""

    def value(ws: Workspace, tmp: Path) -> str:
        folder = tmp / "folder"
        shutil.copytree(ws.shards, folder)
        (folder / name).write_bytes(b"someone else's archive")
        return str(folder)

    return value


def _a_file(ws: Workspace, tmp: Path) -> str:
    (tmp / "shards.bin").write_bytes(b"not a folder")
    return str(tmp / "shards.bin")


TARGETS = [
    Target("data-folder", lambda ws, tmp: "data", "which the pipeline did not write"),
    Target("workspace-itself", lambda ws, tmp: ".", "the workspace"),
    Target("empty-string", lambda ws, tmp: "''", "data.shards_dir"),
    Target("blank-string", lambda ws, tmp: "' '", "shards_dir must name a folder"),
    Target("parent-of-workspace", lambda ws, tmp: "..", "one of its parents"),
    Target("absolute-parent", lambda ws, tmp: str(ws.root.parent.parent), "one of its parents"),
    Target("folder-with-a-foreign-file", _scratch_folder({"notes.txt": "mine"}), "notes.txt"),
    Target(
        "folder-with-a-foreign-manifest",
        _scratch_folder({"manifest.json": '{"format": "someone-else/1"}'}),
        "manifest.json",
    ),
    Target(
        "folder-with-shard-like-names",
        _scratch_folder({"train-1.tar": "x", "manifest.json": "{}"}),
        "which the pipeline did not write",
    ),
    # Named like shards, but no manifest of ours lists them: someone else's (issue 31).
    Target(
        "foreign-shards-without-a-manifest",
        _scratch_folder({"train-000001.tar": "a", "train-000002.tar": "b", "val-000001.tar": "c"}),
        "which the pipeline did not write",
    ),
    Target(
        "our-shards-plus-a-foreign-shard-name",
        _our_shards_plus("train-000099.tar.gz"),
        "train-000099.tar.gz",
    ),
    Target("folder-holding-a-repository", _scratch_folder({".git/HEAD": "ref"}), ".git"),
    Target("a-file", _a_file, "is not a folder"),
    Target("below-a-file", lambda ws, tmp: "params.yaml/shards", "params.yaml is a file"),
]


def test_the_target_table_covers_the_destructive_shards_dirs():
    assert len({t.id for t in TARGETS}) == len(TARGETS) >= 10


@pytest.mark.parametrize("target", TARGETS, ids=[t.id for t in TARGETS])
def test_stage_refuses_a_shards_dir_it_did_not_write_and_changes_nothing(
    target, workspace, tmp_path, capsys
):
    files, registry = workspace.files(), workspace.registry()
    value = target.value(workspace, tmp_path)
    scratch = tree_hashes(tmp_path)

    code, err = run_main(
        ["stage", "--params", str(workspace.params_file), "--set", f"data.shards_dir={value}"],
        capsys,
    )

    assert_one_line(code, err)
    assert target.names in err, err
    assert workspace.files() == files, "a workspace file changed"
    assert workspace.registry() == registry
    assert tree_hashes(tmp_path) == scratch, "the folder named by data.shards_dir changed"
    assert not list(workspace.root.parent.glob(".*.staging-*"))


def test_stage_replaces_a_folder_holding_only_its_own_shards(tmp_path, capsys):
    params = _own_workspace(tmp_path)
    small = _save(tmp_path / "small.npy", 300)
    assert _stage_in_process(params, small, capsys) == 0
    shards = tmp_path / "ws" / "data" / "shards"
    before = tree_hashes(shards)
    again = _save(tmp_path / "other.npy", 400)
    assert _stage_in_process(params, again, capsys) == 0
    assert tree_hashes(shards) != before and (shards / "manifest.json").is_file()
    assert sorted(p.name for p in shards.parent.iterdir()) == ["shards"]


# -- 2. interrupts -----------------------------------------------------------------------------


def _own_workspace(tmp: Path) -> Path:
    ws = tmp / "ws"
    ws.mkdir()
    shutil.copy(REPO / "params.yaml", ws / "params.yaml")
    return ws / "params.yaml"


def _save(path: Path, n: int, side: int = 8) -> Path:
    x = np.random.default_rng(n).integers(0, 256, (n, side, side), dtype=np.uint8)
    np.save(path, x)
    return path


def _stage_args(params: Path, array: Path) -> list[str]:
    return [
        "stage",
        "--params", str(params),
        "--quiet",
        "--set", "data.source=array",
        "--set", f"data.path={array}",
        "--set", "data.image_size=[28, 28]",
    ]  # fmt: skip


def _stage_in_process(params: Path, array: Path, capsys) -> int:
    capsys.readouterr()
    return main(_stage_args(params, array))


def _start_stage(params: Path, array: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", *_stage_args(params, array)],
        cwd=params.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_staging_folder(proc: subprocess.Popen, data: Path, timeout: float = 120) -> Path:
    """The staging folder of proc, once it exists (staging is then writing shards)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(data.glob(f".shards.staging-{proc.pid}-*"))
        if found:
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"stage ended (exit {proc.returncode}) before it began writing")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("stage did not begin writing in time")


def test_sigterm_during_stage_exits_143_with_one_line_and_leaves_nothing_behind(tmp_path, capsys):
    params = _own_workspace(tmp_path)
    data = params.parent / "data"
    assert _stage_in_process(params, _save(tmp_path / "small.npy", 300, 28), capsys) == 0
    previous = tree_hashes(data / "shards")
    big = _save(tmp_path / "big.npy", 60000, 28)  # a few seconds of writing

    proc = _start_stage(params, big)
    _wait_for_staging_folder(proc, data)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)

    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: interrupted"), err
    assert sorted(p.name for p in data.iterdir()) == ["shards"], "a temporary folder was left"
    assert tree_hashes(data / "shards") == previous


def test_sigterm_the_moment_the_staging_folder_is_made_leaves_nothing_behind(
    tmp_path, capsys, monkeypatch
):
    """The narrowest window, made certain: SIGTERM's exception raised right after the staging
    folder's mkdir returns (tempfile.mkdtemp used to return its name only after that, so the
    folder was left; the suite once caught it under load)."""
    import os

    from pipelines.errors import Interrupted

    params = _own_workspace(tmp_path)
    data = params.parent / "data"
    small = _save(tmp_path / "small.npy", 300, 28)
    assert _stage_in_process(params, small, capsys) == 0
    previous = tree_hashes(data / "shards")
    real_mkdir = os.mkdir

    def mkdir_then_sigterm(path, *args, **kwargs):
        real_mkdir(path, *args, **kwargs)
        if ".shards.staging-" in os.fspath(path):
            raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(os, "mkdir", mkdir_then_sigterm)
    assert _stage_in_process(params, _save(tmp_path / "other.npy", 400, 28), capsys) == 143
    monkeypatch.undo()
    assert sorted(p.name for p in data.iterdir()) == ["shards"], "a temporary folder was left"
    assert tree_hashes(data / "shards") == previous


def test_next_stage_removes_what_a_killed_stage_left_and_succeeds(tmp_path, capsys):
    params = _own_workspace(tmp_path)
    data = params.parent / "data"
    small = _save(tmp_path / "small.npy", 300, 28)
    assert _stage_in_process(params, small, capsys) == 0
    big = _save(tmp_path / "big.npy", 60000, 28)

    proc = _start_stage(params, big)
    left = _wait_for_staging_folder(proc, data)
    proc.kill()
    proc.communicate(timeout=60)
    assert left.is_dir(), "SIGKILL runs no cleanup: its staging folder should still be there"

    assert _stage_in_process(params, small, capsys) == 0
    assert sorted(p.name for p in data.iterdir()) == ["shards"]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_runs_are_removed_and_those_of_live_runs_kept(tmp_path):
    target = tmp_path / "shards"
    target.mkdir()
    (target / "manifest.json").write_text("{}")
    dead, live = _dead_pid(), subprocess.Popen(["sleep", "60"])
    try:
        names = {
            f".shards.staging-{dead}-ab12cd34": False,
            f".shards.old-{dead}-ab12cd34": False,
            ".shards.staging-k2j4h5g6": False,  # before runs were named by pid
            f".shards.staging-{live.pid}-ab12cd34": True,
            f".other.staging-{dead}-ab12cd34": True,  # another target's
        }
        for name in names:
            (tmp_path / name / "part").mkdir(parents=True)
        remove_leftovers(target)
        assert {n: (tmp_path / n).exists() for n in names} == names
        assert (target / "manifest.json").is_file()
    finally:
        live.kill()
        live.wait()


def test_shards_a_killed_swap_had_moved_aside_are_put_back(tmp_path):
    target = tmp_path / "shards"
    aside = tmp_path / f".shards.old-{_dead_pid()}-ab12cd34"
    (aside / "shards").mkdir(parents=True)
    (aside / "shards" / "manifest.json").write_text('{"kept": true}')
    staging = tmp_path / f".shards.staging-{_dead_pid()}-ef56gh78"
    staging.mkdir()

    remove_leftovers(target)

    assert json.loads((target / "manifest.json").read_text()) == {"kept": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


# -- 4. manifests that lack fields -----------------------------------------------------------------

# Everything the loader, train, evaluate, register and embed read from manifest.json.
REQUIRED = [
    "format",
    "source",
    "source.name",
    "source.version",
    "sample",
    "sample.shape",
    "sample.dtype",
    "split",
    "split.val_fraction",
    "split.test_fraction",
    "splits",
    "splits.train",
    "splits.val",
    "splits.test",
    "splits.train.samples",
    "splits.train.shards",
    "splits.test.shards[0].name",
    "splits.test.shards[0].samples",
    "splits.test.shards[0].bytes",
    "splits.test.shards[0].sha256",
]

# (id, field path, bad value, what the line names)
WRONG = [
    ("format-of-another-tool", "format", "other-tool/2", "format"),
    ("shape-of-two", "sample.shape", [1, 8], "sample.shape"),
    ("shape-with-zero", "sample.shape", [1, 0, 8], "sample.shape[1]"),
    ("shape-with-a-string", "sample.shape", [1, 8, "8"], "sample.shape[2]"),
    ("float64-samples", "sample.dtype", "float64", "sample.dtype"),
    ("bytes-as-string", "splits.test.shards[0].bytes", "1024", "splits.test.shards[0].bytes"),
    ("negative-samples", "splits.train.samples", -1, "splits.train.samples"),
    ("samples-not-the-sum", "splits.train.samples", 1, "splits.train"),
    ("sha256-not-hex", "splits.test.shards[0].sha256", "xyz", "splits.test.shards[0].sha256"),
    ("name-outside-folder", "splits.test.shards[0].name", "../params.yaml", "shards[0].name"),
    ("shards-not-a-list", "splits.val.shards", {}, "splits.val.shards"),
    ("fraction-as-string", "split.test_fraction", "0.2", "split.test_fraction"),
]


def _parts(field: str) -> list[str | int]:
    out: list[str | int] = []
    for part in field.split("."):
        name, _, index = part.partition("[")
        out.append(name)
        if index:
            out.append(int(index.rstrip("]")))
    return out


def _edit(manifest: dict, field: str, value: object = ...) -> dict:
    """A copy with field deleted (value ...) or set to value."""
    edited = copy.deepcopy(manifest)
    *path, last = _parts(field)
    node = edited
    for part in path:
        node = node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return edited


def _damaged_copy(ws: Workspace, tmp: Path, manifest: dict) -> Path:
    shards = tmp / "shards"
    shutil.copytree(ws.shards, shards)
    (shards / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return shards


def _evaluate_args(ws: Workspace, tmp: Path, shards: Path) -> list[str]:
    """evaluate over shards, with a copy of the trained model whose record names these shards'
    manifest (so the data-version check passes and the manifest itself is what is read)."""
    out = tmp / "outputs"
    shutil.copytree(ws.root / "outputs" / "train", out / "train")
    record = out / "train" / "train_result.json"
    info = json.loads(record.read_text())
    digest = hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
    info["data_version"] = {**(info.get("data_version") or {}), "manifest_sha256": digest}
    record.write_text(json.dumps(info))
    return ["evaluate", "--set", f"outputs_dir={out}"]


def _run_against(command: str, ws: Workspace, tmp: Path, manifest: dict, capsys):
    shards = _damaged_copy(ws, tmp, manifest)
    argv = ["train"] if command == "train" else _evaluate_args(ws, tmp, shards)
    argv += ["--set", f"data.shards_dir={shards}", "--params", str(ws.params_file)]
    return run_main(argv, capsys)


@pytest.mark.parametrize("command", ["train", "evaluate"])
@pytest.mark.parametrize("field", REQUIRED)
def test_a_manifest_lacking_a_field_is_one_line_naming_it(
    field, command, workspace, tmp_path, capsys
):
    manifest = json.loads((workspace.shards / "manifest.json").read_text())
    files, registry = workspace.files(), workspace.registry()

    code, err = _run_against(command, workspace, tmp_path, _edit(manifest, field), capsys)

    assert_one_line(code, err)
    assert f"manifest.json lacks the field {field};" in err, err
    assert FIX in err, err
    assert workspace.files() == files and workspace.registry() == registry


@pytest.mark.parametrize("command", ["train", "evaluate"])
@pytest.mark.parametrize("case", WRONG, ids=[c[0] for c in WRONG])
def test_a_manifest_field_of_the_wrong_type_is_one_line_naming_it(
    case, command, workspace, tmp_path, capsys
):
    _, field, value, names = case
    manifest = json.loads((workspace.shards / "manifest.json").read_text())
    files = workspace.files()

    code, err = _run_against(command, workspace, tmp_path, _edit(manifest, field, value), capsys)

    assert_one_line(code, err)
    assert "manifest.json" in err and names in err and FIX in err, err
    assert workspace.files() == files


def test_the_staged_manifest_passes_the_schema_with_every_required_field(workspace):
    from pipelines.data.shards.manifest import read_manifest

    manifest = read_manifest(workspace.shards).model_dump()
    for field in REQUIRED:
        node = manifest
        for part in _parts(field):
            node = node[part]
