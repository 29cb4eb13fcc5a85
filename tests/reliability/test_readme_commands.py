"""The commands README.md and docs/ show, run (or parsed by the real parsers) as a reader would
type them.

Each test takes its command from the page itself, so an edit that breaks a command fails here.
test_readme_promises.py's COMMAND_TESTS names the tests for every line.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import build_parser, main
from pipelines.errors import ParamsError
from pipelines.params_file import load_params
from pipelines.presets import PRESETS
from tests.data.test_dvc import dvc_repo  # noqa: F401 - the fixture, reused
from tests.helpers.files import file_hashes
from tests.helpers.modules import load_module
from tests.helpers.params import REPO
from tests.reliability.test_readme_promises import (
    doc_command_lines,
    doc_pages,
    readme_command_lines,
)

BIN = Path(sys.executable).parent
SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001
COMMON_FLAGS = ("--params", "--set", "--preset", "--quiet", "--verbose", "--json")


def _docs_text() -> str:
    return "\n".join(page.read_text() for page in doc_pages())


def readme_block(first_line_start: str) -> list[str]:
    """The shell code block (README.md or docs/) whose first command starts with
    first_line_start."""
    for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", _docs_text(), re.S):
        lines = [line for line in readme_command_lines(f"```bash\n{block}```")]
        if lines and lines[0].startswith(first_line_start):
            return lines
    raise AssertionError(f"no shell block in README.md or docs/ starts with {first_line_start!r}")


def readme_command(start: str) -> list[str]:
    """argv of the command line (README.md or docs/, the same wherever shown) that starts with
    start."""
    (line,) = {c for c in doc_command_lines() if c.startswith(start)}
    return shlex.split(line)


def vae_pipeline_invocations() -> list[str]:
    """Every `vae-pipeline ...` the shell blocks of README.md and docs/ run, with usage brackets
    expanded (`[--model 3|champion]` -> `--model 3`) so that the line is one concrete command."""
    found = []
    for line in dict.fromkeys(doc_command_lines()):
        for part in re.split(r"&&|\|\||;", line):
            part = part.strip()
            if part.startswith("vae-pipeline"):
                part = re.sub(r"\[([^\]]*)\]", r"\1", part)
                part = re.sub(r"(\S+?)\|\S+", r"\1", part)
                found.append(part)
    return found


# -- vae-pipeline ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", vae_pipeline_invocations())
def test_every_vae_pipeline_command_in_the_readme_parses_with_the_real_cli(command):
    argv = shlex.split(command)[1:]
    if "--help" in argv:
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args(argv)
        assert done.value.code == 0
        return
    args = build_parser().parse_args(argv)  # a usage error raises, naming the flag
    load_params(REPO / "params.yaml", args.overrides)  # and every --set is a valid override


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for command in SUBCOMMANDS:
        assert f"    {command}" in out, command
    assert set(SUBCOMMANDS) == {"stage", "train", "sweep", "evaluate", "register", "embed",
                                "similar", "generate", "retrain", "serve", "quickstart"}  # fmt: skip


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_subcommand_help_lists_the_common_flags_and_every_preset(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for flag in COMMON_FLAGS:
        assert flag in out, (command, flag)
    joined = "".join(out.split())  # argparse wraps long names at their hyphens
    for name in PRESETS:
        assert name in joined, (command, name)


def test_readme_quickstart_command_trains_the_beta_vae_it_asks_for(tmp_path, monkeypatch, capsys):
    """The README's line as typed in a checkout (params.yaml found in the current folder), plus
    two settings that make it take seconds; exactly one JSON document on stdout."""
    argv = readme_command("vae-pipeline quickstart")[1:]
    assert argv[:5] == ["quickstart", "--set", "model.kind=beta_vae", "--set", "model.beta=4"]
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    fast = ["--quiet", "--set", "train.epochs=2", "--set", "evaluate.iw_k=5"]
    assert main([*argv, *fast]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["units"] == "nats per example"
    saved = json.loads((tmp_path / "outputs/quickstart/model/config.json").read_text())
    assert saved["kind"] == "beta_vae" and saved["beta"] == 4


def _embeddings(path: Path) -> None:
    keys = [f"digits-{i:05d}" for i in range(50)]
    mu = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    mu[7] = 3 * mu[42]  # the same direction as digits-00042: cosine distance 0
    table = pa.table(
        {"key": keys, "split": ["test"] * 50, "label": np.arange(50) % 10, "mu": list(mu)}
    )
    pq.write_table(table, path)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_readme_similar_command_prints_k_neighbours_closest_first_with_labels(
    metric, tmp_path, capsys
):
    argv = readme_command("vae-pipeline similar")[1:]  # similar digits-00042 -k 10 [--metric]
    assert argv[:4] == ["similar", "digits-00042", "-k", "10"]
    _embeddings(tmp_path / "emb.parquet")
    common = ["--embeddings", str(tmp_path / "emb.parquet"), "--params", str(REPO / "params.yaml")]
    assert main([*argv[:4], "--metric", metric, *common, "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["key"], result["label"], result["metric"]) == ("digits-00042", 2, metric)
    neighbours = result["neighbours"]
    assert len(neighbours) == 10 and "digits-00042" not in [n["key"] for n in neighbours]
    distances = [n["distance"] for n in neighbours]
    assert distances == sorted(distances)
    assert all(n["label"] == int(n["key"][-5:]) % 10 for n in neighbours)
    if metric == "cosine":
        assert neighbours[0]["key"] == "digits-00007" and abs(neighbours[0]["distance"]) < 1e-6


def test_readme_cron_override_needs_its_quotes():
    """`--set 'schedule.cron="0 */6 * * *"'` gives that cron; unquoted, a leading `*` is a YAML
    alias, refused in one line rather than read as something else."""
    shown = re.search(r"`--set ('schedule\.cron=[^`]*')`", _docs_text())
    assert shown, "README.md or docs/ shows the quoted cron override"
    (override,) = shlex.split(shown.group(1))
    assert load_params(REPO / "params.yaml", [override]).schedule.cron == "0 */6 * * *"
    with pytest.raises(ParamsError):
        load_params(REPO / "params.yaml", ["schedule.cron=*/6 * * * *"])


def test_readme_params_example_is_a_valid_params_file(tmp_path):
    """The README's params.yaml example, as a whole file (every other setting its default)."""
    (example,) = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    (tmp_path / "params.yaml").write_text(example)
    params = load_params(tmp_path / "params.yaml", [])
    assert (params.model.objective, params.model.mc_samples) == ("iwae", 50)
    assert params.model.likelihood == "bernoulli" and params.data.binarize


# -- make and the virtual environment ------------------------------------------------------


def _make_dry_run(*args: str) -> list[str]:
    """The recipe lines make would run (-n: nothing runs; -B: as on a fresh machine)."""
    # Under `make test` the parent make's MAKEFLAGS/MAKELEVEL would add "Entering directory"
    # lines: run as a user would, from a shell.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    proc = subprocess.run(
        ["make", "--no-print-directory", "-n", "-B", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def test_make_pipeline_sets_up_the_venv_then_runs_retrain_on_the_embedded_default():
    assert "make pipeline" in readme_command_lines()
    lines = _make_dry_run("pipeline")
    assert lines[0] == "python3 -m venv .venv"
    assert any("-c requirements.lock" in line for line in lines), "pins from the lock"
    assert lines[-1] == ".venv/bin/vae-pipeline retrain", "no overrides: the embedded default"


def test_make_test_runs_ruff_the_import_contracts_and_the_whole_suite_as_ci_does():
    assert "make test" in readme_command_lines()
    lines = _make_dry_run("test")
    assert ".venv/bin/ruff check vae pipelines tests benchmarks infra" in lines
    assert ".venv/bin/ruff format --check vae pipelines tests benchmarks infra" in lines
    assert ".venv/bin/lint-imports" in lines
    assert lines[-1] == ".venv/bin/pytest -q -n 2", "every test: no -m, no -k"
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == "make test" and not any(
        line.startswith(("pytest", "make")) for line in ci[:-1]
    )


def test_make_test_with_pytest_workers_0_runs_one_process_and_test_fast_skips_slow():
    assert _make_dry_run("test", "PYTEST_WORKERS=0")[-1] == ".venv/bin/pytest -q -n 0"
    assert _make_dry_run("test-fast")[-1] == '.venv/bin/pytest -q -n 2 -m "not slow"'


def test_make_setup_with_an_empty_torch_spec_keeps_the_torch_already_installed():
    line = "make setup TORCH_SPEC="
    assert line in doc_command_lines()
    default = " ".join(_make_dry_run("setup"))
    kept = " ".join(_make_dry_run("setup", "TORCH_SPEC="))
    assert 'if [ -n "torch==2.13.0" ]; then .venv/bin/pip install -q "torch==2.13.0"' in default
    assert 'if [ -n "" ]; then' in kept, "an empty spec skips the torch install"
    assert "torch==2.13.0" in (REPO / "requirements.lock").read_text()


def test_source_venv_activate_puts_the_console_script_on_path():
    assert "source .venv/bin/activate" in readme_command_lines()
    assert (BIN / "activate").is_file() and (BIN / "vae-pipeline").is_file()


# -- the data-versioning block, for real ----------------------------------------------------


@pytest.mark.slow
def test_readme_data_block_versions_commits_pushes_and_pulls_back_byte_identical_shards(
    dvc_repo,  # noqa: F811
):
    """docs/data.md's four lines, typed in a clone of this repo (data/stage.json committed, no
    dvc.lock) whose data settings changed, so staging makes a new version; then, as on another
    machine with no shards and no cache, `dvc pull data.dvc` brings it back byte for byte."""
    repo, env = dvc_repo
    (repo / "data").mkdir(exist_ok=True)
    for name in (".gitignore", "data/stage.json", "data/.gitignore"):
        shutil.copy(REPO / name, repo / name)
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("shard_size: null", "shard_size: 64"))

    def bash(line: str) -> str:
        proc = subprocess.run(["bash", "-c", line], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout + proc.stderr

    bash("git add -A && git commit -qm clone")
    lines = readme_block("dvc repro stage")
    assert [line.split()[:2] for line in lines] == [
        ["dvc", "repro"], ["git", "add"], ["dvc", "push"], ["dvc", "pull"]
    ]  # fmt: skip
    for line in lines[:3]:
        bash(line)
    assert (repo / "data.dvc").read_text() != (REPO / "data.dvc").read_text(), "a new version"
    assert "nothing to commit" in bash("git status")
    # what was committed describes the new shards: the stage is not stale in the next clone
    assert "up to date" in bash("dvc status stage")
    before = file_hashes(repo / "data" / "shards")

    shutil.rmtree(repo / "data" / "shards")  # another machine: no shards, no cache
    shutil.rmtree(repo / ".dvc" / "cache")
    bash(lines[3])
    assert file_hashes(repo / "data" / "shards") == before
    assert "up to date" in bash("dvc status data.dvc")


# -- benchmarks -----------------------------------------------------------------------------


def _benchmark_invocations() -> list[tuple[str, list[str]]]:
    """(script, flags) for each benchmark docs/ runs or quotes in docs/benchmarks.md's tables."""
    found = []
    for line in dict.fromkeys(doc_command_lines()):
        words = shlex.split(line)
        if words[0] == ".venv/bin/python" and words[1].startswith("benchmarks/"):
            found.append((words[1], words[2:]))
    results = (REPO / "docs" / "benchmarks.md").read_text()
    for script, flags in re.findall(r"\(`(\w+\.py)((?: --[\w-]+(?: \w+)?)*)`", results):
        found.append((f"benchmarks/{script}", flags.split()))
    return found


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("script,flags", _benchmark_invocations(), ids=lambda v: str(v))
def test_every_benchmark_the_readme_runs_accepts_the_flags_it_shows(script, flags, monkeypatch):
    """Each script's own argparse parser, captured before the benchmark starts, parses the
    flags docs/ shows (the benchmarks themselves run on demand: minutes each)."""
    import argparse

    path = REPO / script
    assert path.is_file(), script
    parsers: list[argparse.ArgumentParser] = []

    def capture(self, args=None, namespace=None):
        parsers.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    module = load_module(f"readme_{path.stem}", path, fresh=True)
    with pytest.raises(_Parsed):
        module.main()
    monkeypatch.undo()
    parsers[0].parse_args(flags)  # exits 2 on a flag or value the script does not take
