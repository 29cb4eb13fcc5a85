"""`train` checks what it can before Ray starts or an MLflow run exists, and whatever stops it
afterwards leaves no RUNNING run and no temporary folder.

The refusals run `main()` in-process against the shared workspace: exit 2, one `error:` line,
every workspace file byte-identical (the MLflow SQLite file included, so no run was created)
and no run folder made. Two tests start Ray: the cluster-resources check (it needs a connected
cluster) and the interrupt, which sends a real SIGTERM to `vae-pipeline train`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.data.staging import StageJob
from tests.helpers.mounts import cli_on_read_only, in_mount_namespace
from tests.helpers.params import REPO
from tests.reliability.conftest import Workspace


def _refused(ws: Workspace, capsys, *sets: str) -> str:
    """train with the overrides: refused in one line before Ray or MLflow started."""
    import ray

    ray_was_running = ray.is_initialized()
    files, registry = ws.files(), ws.registry()
    capsys.readouterr()
    argv = ["train", *[x for s in sets for x in ("--set", s)]]
    code = main([*argv, "--params", str(ws.params_file), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert ws.files() == files, "a workspace file changed (an MLflow run or a run folder)"
    assert ws.registry() == registry
    assert ray.is_initialized() == ray_was_running, "Ray was started"
    return err


def _refused_in_a_new_process(
    ws: Workspace, *sets: str, prefix: tuple[str, ...] = (), env: dict | None = None
) -> str:
    """As _refused, in a fresh `vae-pipeline train`: no Ray this test session started can stand
    in for the one the command would start or join."""
    files, registry = ws.files(), ws.registry()
    argv = [*prefix, str(Path(sys.executable).parent / "vae-pipeline"), "train", "--params",
            str(ws.params_file), "--quiet", *[x for s in sets for x in ("--set", s)]]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, env=env)
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert err.startswith("error: ") and "\n" not in err, err  # nothing from Ray either
    assert ws.files() == files, "a workspace file changed (an MLflow run or a run folder)"
    assert ws.registry() == registry
    return err


def test_gpus_this_machine_lacks_are_refused_before_ray_starts(workspace):
    import torch

    asked = torch.cuda.device_count() + 1  # one more worker than there are GPUs
    assert asked <= 2, "the workspace's splits have 2 shards each: more workers fail on those"
    err = _refused_in_a_new_process(
        workspace, "cluster.use_gpu=true", f"cluster.num_workers={asked}"
    )
    assert f"needs {asked} GPU(s), but this machine has {asked - 1}" in err, err


@pytest.mark.parametrize(
    ("sets", "split"),
    [
        # every split has 2 shards (train first)
        (("cluster.num_workers=3", "train.batch_parts=3", "train.batch_size=96"), "train"),
        (("cluster.num_workers=2", "cluster.loader_workers=2"), "train"),
        (("cluster.num_workers=1", "cluster.loader_workers=3"), "train"),
        (("cluster.num_workers=1", "train.batch_parts=4"), "train"),
    ],
    ids=["parts", "parts-x-loader-workers", "loader-workers", "parts-on-one-worker"],
)
def test_more_workers_than_shards_is_refused_before_ray_starts(workspace, capsys, sets, split):
    err = _refused(workspace, capsys, *sets)
    assert f"split {split} has" in err and "data.min_shards_per_split" in err, err


def test_more_workers_than_parts_of_the_batch_is_refused_before_ray_starts(workspace, capsys):
    err = _refused(workspace, capsys, "cluster.num_workers=3")  # train.batch_parts: 2
    assert err.startswith("error: cluster.num_workers=3 is more than train.batch_parts=2"), err
    assert "set train.batch_parts to 3" in err, err


def test_a_batch_that_does_not_cut_into_equal_parts_is_refused_before_ray_starts(workspace, capsys):
    err = _refused(workspace, capsys, "train.batch_size=127")
    assert "batch_parts" in err and "127" in err, err


@pytest.mark.parametrize(
    ("value", "names"),
    [(".", "the workspace"), ("..", "the workspace"), (".git/runs", ".git")],
    ids=["workspace", "its-parent", "inside-git"],
)
def test_storage_path_on_the_workspace_is_refused(workspace, capsys, value, names):
    err = _refused(workspace, capsys, f"cluster.storage_path={value}")
    assert err.startswith("error: cluster.storage_path") and names in err, err


def test_outputs_dir_inside_a_repository_folder_is_refused(workspace, capsys):
    err = _refused(workspace, capsys, "outputs_dir=.dvc/out")
    assert "outputs_dir" in err and ".dvc" in err, err


def test_outputs_dir_that_is_a_file_is_refused(workspace, capsys, tmp_path):
    (tmp_path / "out").write_text("a file\n")
    err = _refused(workspace, capsys, f"outputs_dir={tmp_path / 'out'}")
    assert f"outputs_dir: {tmp_path / 'out'} is a file" in err, err


def test_an_exported_model_folder_holding_foreign_files_is_not_replaced(
    workspace, capsys, tmp_path
):
    model = tmp_path / "out" / "train" / "model"
    model.mkdir(parents=True)
    (model / "thesis.tex").write_text("mine\n")
    err = _refused(workspace, capsys, f"outputs_dir={tmp_path / 'out'}")
    assert "thesis.tex" in err, err
    assert (model / "thesis.tex").read_text() == "mine\n"


def test_a_users_own_files_where_train_writes_are_not_overwritten(workspace, capsys, tmp_path):
    """`my/train/history.json` is the user's own (no mark of ours, no train_result.json)."""
    mine = tmp_path / "my" / "train"
    mine.mkdir(parents=True)
    (mine / "history.json").write_text("my notes\n")
    err = _refused(workspace, capsys, f"outputs_dir={tmp_path / 'my'}")
    assert "history.json" in err and "was not written by vae-pipeline" in err, err
    assert (mine / "history.json").read_text() == "my notes\n"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_in_the_first_moments_is_one_line_never_a_traceback(tmp_path, signum):
    """While the CLI is still importing torch and the rest (about a second): pipelines.entry's
    handlers give the same one line, and with --json one JSON document, before any write."""
    argv = [str(Path(sys.executable).parent / "vae-pipeline"), "train", "--json"]
    proc = subprocess.Popen(
        argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C as a terminal's foreground command gets it: a suite started in the background
        # of a non-interactive shell hands its children SIGINT ignored, which the command
        # rightly keeps ignored (the next test).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    _wait_until_sigterm_is_caught(proc.pid)  # entry's handlers are in (SIGINT's first)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: interrupted by"), err
    assert json.loads(out)["exit_code"] == 128 + signum
    assert list(tmp_path.iterdir()) == [], "nothing written"


def test_an_ignored_sigint_stays_ignored(tmp_path):
    """A command started with SIGINT ignored (a background job of a script, nohup) is not
    stopped by one: it runs to its own end, here the one line about missing shards."""
    argv = [str(Path(sys.executable).parent / "vae-pipeline"), "train", "--json"]
    proc = subprocess.Popen(
        argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    _wait_until_sigterm_is_caught(proc.pid)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert json.loads(out)["error"].startswith("no staged shards"), out


def _wait_until_sigterm_is_caught(pid: int, timeout: float = 30) -> None:
    """Until the process has a SIGTERM handler (bit 15 of SigCgt in /proc/<pid>/status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(next(x for x in status.splitlines() if x.startswith("SigCgt:")).split()[1], 16)
        if caught & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.005)
    raise AssertionError("the command never installed its SIGTERM handler")


def test_a_run_folder_that_is_not_a_training_run_is_refused(workspace, capsys, tmp_path):
    run = tmp_path / "runs" / "mine"
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("mine\n")
    err = _refused(
        workspace, capsys, f"cluster.storage_path={tmp_path / 'runs'}", "cluster.run_name=mine"
    )
    assert "notes.txt" in err and "cluster.run_name" in err, err
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    ("address", "names"),
    [("127.0.0.1:{port}", "no Ray cluster answers there"), ("head-node", "not a Ray address")],
    ids=["nothing-listening", "no-port"],
)
def test_a_ray_address_without_a_cluster_is_refused_in_seconds(workspace, address, names):
    """ray.init would retry a dead address for minutes, with the MLflow run not yet made."""
    from tests.servers import free_port

    address = address.format(port=free_port())
    err = _refused_in_a_new_process(workspace, f"cluster.address={address}")
    assert err.startswith(f"error: cluster.address {address}") and names in err, err


@pytest.mark.parametrize(
    ("record", "names"),
    [
        (True, "auto, which found the last head started here, "),
        (False, "auto: no Ray cluster was started on this machine"),
    ],
    ids=["head-gone", "none-started"],
)
def test_auto_without_a_live_head_is_refused_in_seconds(workspace, tmp_path, record, names):
    """'auto' joins the head the last `ray start` here recorded in Ray's temp folder, a record
    that outlives a head killed outright: ray.init retried its address for minutes. In a PID
    namespace of its own, where no other test's Ray can be what 'auto' falls back to."""
    from tests.servers import free_port

    port = free_port()
    if record:
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_TMPDIR": str(tmp_path)
    }
    own_pids = ("unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--map-root-user")
    start = time.monotonic()
    err = _refused_in_a_new_process(workspace, "cluster.address=auto", prefix=own_pids, env=env)
    assert err.startswith(f"error: cluster.address {names}"), err
    assert not record or f":{port}: no Ray cluster answers there" in err, err
    assert time.monotonic() - start < 60, "refused before ray.init's retries"


def test_read_only_outputs_and_storage_folders_are_refused_before_ray_starts(workspace, tmp_path):
    """A real read-only mount in a private mount namespace: root ignores permission bits."""
    ro = tmp_path / "ro"
    ro.mkdir()
    cases = {
        "outputs_dir": ["train", "--set", f"outputs_dir={ro / 'out'}"],
        "cluster.storage_path": ["train", "--set", f"cluster.storage_path={ro / 'runs'}"],
    }
    files = workspace.files()
    results = cli_on_read_only(ro, workspace.params_file, cases)
    for setting in cases:
        err = results[setting]["err"]
        assert results[setting]["code"] == 2, err
        assert err.startswith(f"error: {setting}: cannot write in {ro}") and "\n" not in err, err
        assert "read-only file system" in err.lower(), err
    assert results["entries"] == [], "nothing was written there"
    assert workspace.files() == files


@pytest.mark.slow
def test_workers_a_connected_ray_cluster_cannot_place_are_refused_before_the_mlflow_run(
    workspace, local_ray, capsys
):
    """The session's in-process Ray has 2 CPUs: two workers of 2 CPUs each never fit."""
    err = _refused(workspace, capsys, "cluster.num_workers=2", "cluster.cpus_per_worker=2")
    assert "2 CPUs" in err and "room for 1" in err and "cluster.cpus_per_worker" in err, err


# -- interrupts --------------------------------------------------------------------------------


def _mlflow_status(db: Path, run_id: str) -> str:
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{db}").get_run(run_id).info.status


def _wait_for_checkpoint(runs: Path, proc: subprocess.Popen, timeout: float) -> Path:
    """The run folder once it holds the MLflow run id and a finished epoch's checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "train ended before it could be interrupted"
        for run in runs.glob("*/mlflow_run_id"):
            if any(run.parent.glob("checkpoint_*/state.pt")):
                return run.parent
        time.sleep(0.1)
    raise TimeoutError(f"no checkpoint under {runs} after {timeout}s")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_sigterm_or_ctrl_c_during_training_exits_with_one_line_and_the_run_killed(
    workspace, tmp_path, signum
):
    """SIGTERM to the command (timeout, CI, Prefect cancelling), or Ctrl-C: SIGINT to its
    whole process group, as a terminal sends it. Ray Train's own SIGINT handler used to exit 1
    with no word; now 128 + the signal, one line, the MLflow run KILLED."""
    ws = tmp_path / "ws"
    shutil.copytree(workspace.root, ws, ignore=shutil.ignore_patterns("runs", "outputs"))
    argv = [
        str(Path(sys.executable).parent / "vae-pipeline"), "train",
        "--params", str(ws / "params.yaml"), "--quiet",
        "--set", f"mlflow.tracking_uri=sqlite:///{ws / 'mlflow.db'}",
        # Long enough that the signal always lands mid-training.
        "--set", "train.epochs=1000", "--set", "train.early_stopping_patience=null",
        "--set", "cluster.num_workers=1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd=ws, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        run = _wait_for_checkpoint(ws / "runs", proc, timeout=300)
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("error: interrupted"), stderr[-3000:]
    assert "Traceback" not in stderr.split(errors[0])[-1]
    run_id = (run / "mlflow_run_id").read_text().strip()
    assert _mlflow_status(ws / "mlflow.db", run_id) == "KILLED"
    train_out = ws / "outputs" / "train"
    leftovers = [p.name for p in train_out.iterdir()] if train_out.exists() else []
    assert not [n for n in leftovers if n.startswith(".") and n != ".vae-pipeline"], leftovers


_FULL_DISK = textwrap.dedent(
    r"""
    import json, os, subprocess, sys
    from pathlib import Path
    from pipelines.training.export import _replace_dir

    out, src = Path(sys.argv[1]), Path(sys.argv[2])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(out)], check=True)
    (out / "model").mkdir()
    (out / "model" / "config.json").write_text("old")
    try:
        _replace_dir(src, out / "model")
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    print(json.dumps({
        "error": error,
        "entries": sorted(os.listdir(out)),
        "model": sorted(os.listdir(out / "model")),
        "config": (out / "model" / "config.json").read_text(),
    }))
    """
)


def test_an_export_that_fills_the_disk_keeps_the_old_model_and_leaves_no_temp_folder(tmp_path):
    """A 1 MiB tmpfs in a private mount namespace: the 2 MiB model does not fit."""
    src, out = tmp_path / "best", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (src / "config.json").write_text("new")
    (src / "model.safetensors").write_bytes(os.urandom(2 << 20))
    result = in_mount_namespace(_FULL_DISK, str(out), str(src), timeout=120, cwd=REPO)
    # One line for the CLI, with the real cause: the disk really was full.
    assert result["error"].startswith("PipelineError: cannot export the trained model to")
    assert "no space left on device" in result["error"] and "\n" not in result["error"]
    assert result["entries"] == ["model"], "no .model.tmp or .model.old left behind"
    assert result["model"] == ["config.json"] and result["config"] == "old"


def test_a_model_of_another_dataset_in_outputs_is_not_replaced(tmp_path, capsys):
    """Staging Fashion-MNIST after digits and training again would have replaced the digits
    model and figures: train refuses, naming both datasets and how to keep both."""
    import numpy as np

    from pipelines.data.staging import stage_shards
    from pipelines.params_file import load_params

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    x = (np.random.default_rng(0).random((300, 8, 8)) * 255).astype(np.uint8)
    np.save(tmp_path / "x.npy", x)
    sets = ["data.source=array", f"data.path={tmp_path / 'x.npy'}", "cluster.num_workers=1",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]  # fmt: skip
    stage_shards(StageJob.from_params(load_params(tmp_path / "params.yaml", sets)), progress=False)
    theirs = tmp_path / "outputs" / "train"
    (theirs / "model").mkdir(parents=True)
    (theirs / "model" / "model.safetensors").write_bytes(b"the digits weights")
    (theirs / "train_result.json").write_text(json.dumps({"data_source": "digits"}))
    before = {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()}
    capsys.readouterr()
    argv = ["train", "--params", str(tmp_path / "params.yaml"), "--quiet"]
    code = main([*argv, *[x for s in sets for x in ("--set", s)]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert "holds the digits model" in err and "the staged data is array" in err, err
    assert "register.name=array-vae" in err and "outputs_dir=outputs/array" in err, err
    assert {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "runs").exists(), "refused before any run folder"
