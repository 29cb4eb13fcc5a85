"""dvc.yaml deps cover every module a stage runs, so `dvc repro` cannot miss a code change.
(The one-way imports are checked by import-linter in `make lint`: pyproject.toml.)"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

import grimp
import pytest
import yaml

from tests.helpers.params import REPO

# The function each dvc.yaml stage's `vae-pipeline <command>` runs lives in this module; the
# command line itself (cli, params, errors) runs for every stage.
STAGE_ENTRY = {
    "stage": "pipelines.data.staging",
    "train": "pipelines.training.driver",
    "evaluate": "pipelines.evaluation.evaluate",
    "register": "pipelines.registry.register",
}
COMMAND_LINE = (
    "pipelines.entry",
    "pipelines.cli",
    "pipelines.cli_args",
    "pipelines.cli_output",
    "pipelines.cli_process",
    "pipelines.cli_sweep",
    "pipelines.commands",
    "pipelines.params",
    "pipelines.params_file",
    "pipelines.errors",
)


# The console script and its command table import each stage lazily, only for its command.
_DISPATCH = ("pipelines.entry", "pipelines.cli", "pipelines.cli_sweep", "pipelines.commands")


def _module_file(module: str) -> Path:
    path = REPO / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _stage_modules(graph: grimp.ImportGraph, entry: str) -> set[str]:
    """entry, the command line, and everything they import (the command line's imports of the
    other stages aside: it imports each stage lazily, only when that command runs)."""
    modules = {entry, *graph.find_upstream_modules(entry)}
    for module in COMMAND_LINE:
        modules.add(module)
        if module not in _DISPATCH:
            modules |= graph.find_upstream_modules(module)
    for module in list(modules):
        if module not in _DISPATCH:
            modules |= graph.find_upstream_modules(module)
    return {m for m in modules if m.split(".")[0] in ("pipelines", "vae")}


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


@pytest.mark.parametrize("stage", sorted(STAGE_ENTRY))
def test_every_module_a_dvc_stage_runs_is_among_its_deps(stage):
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert f"vae-pipeline {stage}" in stages[stage]["cmd"]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stages[stage]["deps"]]
    graph = grimp.build_graph("pipelines", "vae")
    missing = sorted(
        str(_module_file(m).relative_to(REPO))
        for m in _stage_modules(graph, STAGE_ENTRY[stage])
        if not _covered(_module_file(m), deps)
    )
    assert not missing, f"dvc.yaml stage {stage} runs these but does not list them: {missing}"


@pytest.mark.slow
def test_editing_a_module_a_stage_imports_makes_dvc_rerun_that_stage(tmp_path):
    """The real thing, with the train stage's own deps in a scratch DVC repo: once recorded,
    touching the shard loader (which train imports through the data package, listed as a
    folder) makes `dvc status` report train as changed."""
    repo = tmp_path / "repo"
    for folder in ("pipelines", "vae"):
        shutil.copytree(REPO / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    (repo / "data").mkdir()
    shutil.copy(REPO / "data" / "stage.json", repo / "data" / "stage.json")
    train = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]
    stage = {"cmd": "true", "deps": train["deps"], "params": train["params"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}))
    env = {"DVC_NO_ANALYTICS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def dvc(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    dvc("init", "--no-scm", "--quiet")
    dvc("config", "--local", "core.site_cache_dir", str(tmp_path / "site-cache"))
    dvc("repro", "--quiet", "train")
    assert (yaml.safe_load(dvc("status", "--json")) or {}) == {}
    loader = repo / "pipelines" / "data" / "shards" / "loader.py"
    loader.write_text(loader.read_text() + "\n# edited\n")
    status = yaml.safe_load(dvc("status", "--json")) or {}
    assert "train" in status, "editing the loader left the train stage up to date"
    assert "pipelines/data" in yaml.safe_dump(status["train"])


def test_no_function_in_the_library_or_pipeline_is_over_60_lines():
    """A function a reader must scroll through is split (STYLE.md: nanoGPT keeps under ~55)."""
    import ast

    long = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)"
        for package in ("vae", "pipelines")
        for path in sorted((REPO / package).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and (length := node.end_lineno - node.lineno + 1) > 60
    ]
    assert not long, long


def test_no_file_in_the_pipeline_is_over_450_lines():
    """A file does one job; one that grows past this is doing several."""
    long = [
        f"{path.relative_to(REPO)} ({n} lines)"
        for path in sorted((REPO / "pipelines").rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > 450
    ]
    assert not long, long


# The edges that unpack the whole params file: the command line, the flow's and each stage's
# from_params, and the adapters they share (tracking.store_of, paths.layout, ...). Every other
# function takes its own sections and plain values.
MAX_FUNCTIONS_TAKING_PARAMS = 25


def test_only_the_edges_take_the_whole_params():
    import ast

    takers = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name}"
        for path in sorted((REPO / "pipelines").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and any(
            a.annotation is not None and ast.unparse(a.annotation).strip("'\"") == "Params"
            for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)
        )
    ]
    assert len(takers) <= MAX_FUNCTIONS_TAKING_PARAMS, "\n".join(takers)
    commands = [t for t in takers if t.startswith("pipelines/commands.py")]
    others = [t.rsplit(" ", 1)[1] for t in takers if t not in commands]
    stage_entries = {"stage_shards", "train_model", "evaluate_model", "register_model", "prune"}
    assert not stage_entries & set(others), "a stage function takes the whole params"


def test_model_and_train_settings_are_declared_once_in_vae():
    """params.yaml's model: and train: sections are the vae dataclasses' fields, with their
    defaults: adding or changing a setting in vae/ changes the pipeline's schema with it."""
    import dataclasses

    from pipelines.params import ModelParams, TrainParams
    from vae import ModelConfig, TrainConfig

    for section, config, derived in (
        (ModelParams, ModelConfig, {"input_shape"}),
        (TrainParams, TrainConfig, set()),
    ):
        fields = {f.name for f in dataclasses.fields(config)} - derived
        assert set(section.model_fields) == fields
        defaults = config(**({"input_shape": (64,)} if derived else {}))
        for name in fields:
            value = section().model_dump()[name]
            expected = getattr(defaults, name)
            if dataclasses.is_dataclass(expected):
                expected = dataclasses.asdict(expected)
            assert value == expected, name


@dataclasses.dataclass
class _Inner:
    rate: float = 0.5


@dataclasses.dataclass
class _Outer:
    derived: int = 1
    size: int = 3
    sizes: tuple[int, ...] = (4, 5)
    mode: Literal["a", "b"] = "a"
    free: float = 2.0
    inner: _Inner = dataclasses.field(default_factory=lambda: _Inner(0.25))
    plain: _Inner = dataclasses.field(default_factory=_Inner)  # nested, no bounds given
    after: int = 9  # a field after the nested ones


def test_a_section_built_from_a_dataclass_has_its_types_defaults_and_the_given_bounds():
    """What builds the model:/train: sections, called on a dataclass of each kind of field."""
    from pydantic import Field, ValidationError

    from pipelines.params import _section_from

    bounds = {"size": Field(gt=0), "sizes": Field(gt=0), "inner": {"rate": Field(lt=1)}}
    section = _section_from(_Outer, bounds, exclude=frozenset({"derived"}))
    assert section.__name__ == "_OuterParams"
    assert list(section.model_fields) == [
        "size", "sizes", "mode", "free", "inner", "plain", "after"
    ]  # fmt: skip
    assert section().model_dump() == {
        "size": 3, "sizes": (4, 5), "mode": "a", "free": 2.0, "inner": {"rate": 0.25},
        "plain": {"rate": 0.5}, "after": 9,
    }  # fmt: skip
    assert section(plain={"rate": 3.0}).model_dump()["plain"] == {"rate": 3.0}
    assert section(size="7", sizes=["8"], mode="b", free=-1.5).model_dump()["sizes"] == (8,)
    for bad in ({"size": 0}, {"sizes": (4, 0)}, {"mode": "c"}, {"inner": {"rate": 1}},
                {"derived": 2}, {"free": float("nan")}):  # fmt: skip
        with pytest.raises(ValidationError):
            section(**bad)
