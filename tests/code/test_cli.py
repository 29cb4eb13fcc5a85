"""The `vae-pipeline` command line: JSON results, one-line errors, helpful --help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.params_file import load_params
from tests.helpers.params import REPO


def test_quickstart_prints_one_json_line_with_held_out_metrics(tmp_path, capsys):
    code = main(
        [
            "quickstart", "--json", "--quiet", "--params", "params.yaml",
            "--set", "train.epochs=3", "--set", "evaluate.iw_k=10",
            "--out", str(tmp_path / "qs"),
        ]
    )  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    m = result["metrics"]
    assert m["likelihood"] == "gaussian" and m["units"] == "nats per example"
    assert m["iw_k"] == 10 and m["neg_elbo"] >= m["iw_nll"] - 1.0
    assert (tmp_path / "qs" / "model" / "model.safetensors").is_file()
    # The pipeline's hash split: the test examples `stage` puts in the test shards.
    assert (
        m["n_examples"] == json.loads((REPO / "data" / "stage.json").read_text())["samples"]["test"]
    )


def test_bad_override_is_a_one_line_error_with_exit_code_2(capsys):
    code = main(["quickstart", "--set", "model.latent_dim=0", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("error: ")
    assert "latent_dim" in err


def test_unknown_param_key_is_refused_naming_the_key(capsys):
    assert main(["quickstart", "--set", "train.epoch=3"]) == 2
    assert "train.epoch" in capsys.readouterr().err


def test_missing_params_file_is_a_clear_error(capsys, tmp_path):
    assert main(["quickstart", "--params", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_override_values_are_parsed_as_yaml():
    p = load_params("params.yaml", ["model.hidden=[32, 16]", "train.lr=0.01"])
    assert p.model.hidden == (32, 16) and p.train.lr == 0.01


def test_console_script_help_lists_the_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "quickstart" in out and "nats" in out


def test_a_reader_that_goes_away_is_not_a_traceback(tmp_path):
    """`vae-pipeline ... --json | head -c 10`: the pipe closes before the JSON is printed."""
    import shutil
    import subprocess
    import sys

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "stage", "--json", "--quiet"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


SUBCOMMANDS = ("stage", "train", "sweep", "evaluate", "register", "embed", "similar",
               "generate", "retrain", "serve", "quickstart")  # fmt: skip


def test_every_subcommand_prints_exactly_one_json_document_on_errors_too(capsys):
    for command in SUBCOMMANDS:
        args = ["digits-00001"] if command == "similar" else []
        code = main([command, *args, "--json", "--quiet", "--set", "nope.key=1"])
        out = capsys.readouterr().out
        assert code == 2, command
        doc = json.loads(out)  # the whole of stdout, not its last line
        assert doc["exit_code"] == 2 and "nope" in doc["error"], (command, doc)


def test_with_json_anything_else_written_to_stdout_goes_to_stderr(capfd):
    """Ray workers' lines and child processes write to the descriptor, threads to sys.stdout:
    both land on stderr while the command runs; the result alone reaches stdout."""
    from pipelines.cli_process import stdout_kept_for_the_result as _stdout_kept_for_the_result

    with _stdout_kept_for_the_result(True):
        os.system("echo from-a-child-process")
        print("from-python", flush=True)
    print('{"result": 1}', flush=True)
    out, err = capfd.readouterr()
    assert json.loads(out) == {"result": 1}
    assert "from-a-child-process" in err and "from-python" in err


@pytest.mark.parametrize("seed", ["99999999999999999999999", "-1", "4294967296", "x"])
def test_a_seed_torch_cannot_take_is_one_line_exit_2(capsys, seed):
    """generate --seed once crashed in torch.manual_seed with a 23-digit number."""
    code = main(["generate", "--seed", seed, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: argument --seed") and "\n" not in err, err


def test_an_os_error_without_a_file_name_still_says_where_or_what():
    """'no space left on device: a file' named nothing; a ConnectionError is no file's."""
    import errno

    from pipelines.cli_process import os_error_line as _os_error_line

    full = _os_error_line(OSError(errno.ENOSPC, "No space left on device"))
    assert full.startswith("no space left on device while writing under the working folder")
    assert "network connection failed" in _os_error_line(ConnectionResetError(104, "reset"))
    named = _os_error_line(PermissionError(13, "Permission denied", "/x/y"))
    assert named.startswith("permission denied: /x/y")


def test_the_interrupt_line_advises_what_the_interrupted_command_does():
    """Only train (and retrain and sweep, through it) resumes from a checkpoint: evaluate's
    line must not promise that."""
    from pipelines.cli_process import interrupted_line

    assert "train resumes from its latest checkpoint" in interrupted_line("SIGINT", "train")
    assert "finished trials are reused" in interrupted_line("SIGTERM", "sweep")
    evaluate = interrupted_line("SIGINT", "evaluate")
    assert evaluate.endswith("re-run the same command") and "checkpoint" not in evaluate


def test_version_and_human_output_without_python_values():
    import subprocess
    import sys

    from pipelines.cli_output import human_text

    out = subprocess.run(
        [str(Path(sys.executable).parent / "vae-pipeline"), "--version"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert out.stdout.startswith("vae-pipeline ") and out.stdout.split()[1][0].isdigit()
    text = human_text({"reused": None, "stopped": True, "appended": False, "n": 3})
    assert text.splitlines() == ["stopped: yes", "appended: no", "n: 3"]


@pytest.mark.parametrize("verbose", [False, True])
def test_mlflows_view_run_lines_are_off_unless_verbose(verbose, monkeypatch):
    """MLflow prints "View run ... at: http://..." to stdout when a run ends against a tracking
    server (a print, not a log record): the quiet default turns it off through the switch MLflow
    itself reads, in the environment that served flow runs and Ray inherit; --verbose keeps it."""
    from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT

    from pipelines.cli_process import quiet_libraries
    from pipelines.cluster import VERBOSE_ENV

    for name in (MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.name, VERBOSE_ENV, "MLFLOW_LOGGING_LEVEL"):
        monkeypatch.setenv(name, "")  # recorded, so the test puts back what was there
        monkeypatch.delenv(name)
    quiet_libraries(verbose)
    assert MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get() is (not verbose)
