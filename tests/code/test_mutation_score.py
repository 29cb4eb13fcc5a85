"""`make mutation`'s recipe and the score it prints (benchmarks/mutation_score.py), on made-up
verdicts: the mutation run itself is on demand, not part of the suite."""

from __future__ import annotations

import re

import yaml

from tests.helpers.modules import load_module
from tests.helpers.params import REPO


def _score_module():
    return load_module("mutation_score", REPO / "benchmarks/mutation_score.py")


def test_the_score_counts_timeouts_as_killed_and_leaves_out_equivalents_and_unchecked():
    results = {f"vae.m.x_f__mutmut_{i}": "killed" for i in range(16)}
    results |= {"vae.m.x_f__mutmut_16": "timeout", "vae.m.x_f__mutmut_17": "survived",
                "vae.m.x_f__mutmut_18": "survived", "vae.m.x_f__mutmut_19": "no tests",
                "pipelines.p.x_g__mutmut_1": "killed", "pipelines.p.x_g__mutmut_2": "not checked"}  # fmt: skip
    areas = _score_module().score(results, {"vae.m.x_f__mutmut_18": "equivalent"})
    vae, pipelines = areas["vae"], areas["pipelines"]
    assert (vae["mutants"], vae["killed"], vae["equivalent"]) == (20, 17, 1)
    assert vae["survived"] == ["vae.m.x_f__mutmut_17", "vae.m.x_f__mutmut_19"]
    assert vae["score"] == round(17 / 19, 4) and vae["goal_met"] is False
    assert (pipelines["not_checked"], pipelines["score"]) == (1, 1.0)
    assert pipelines["goal_met"] is False  # an unfinished run meets no goal


def test_every_listed_equivalent_names_a_mutant_of_the_mutated_code_and_says_why():
    listed = yaml.safe_load((REPO / "benchmarks/mutation_equivalents.yaml").read_text())
    pyproject = (REPO / "pyproject.toml").read_text()
    assert "[tool.mutmut]" in pyproject
    for name, why in listed.items():
        module = re.match(r"^([\w.]+)\.x", name).group(1)
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), name
        assert re.search(r"__mutmut_\d+$", name), name
        assert isinstance(why, str) and len(why) > 10, name


def test_make_mutation_installs_mutmut_runs_it_and_prints_the_score():
    from tests.reliability.test_readme_commands import _make_dry_run

    lines = _make_dry_run("mutation")
    assert any('-c requirements-dev.lock -e ".[s3,dev,mutation]"' in line for line in lines)
    assert any(".venv/bin/mutmut run --max-children 2" in line for line in lines)
    assert lines[-2] == ".venv/bin/python benchmarks/mutation_score.py"
    # mutmut leaves module-level constants alone: the hand-written constant mutants follow.
    assert lines[-1] == ".venv/bin/python benchmarks/constant_mutants.py"
