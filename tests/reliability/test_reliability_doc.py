"""docs/reliability.md is a promise: every test it cites must exist."""

from __future__ import annotations

import ast
import re

from tests.helpers.params import REPO


def test_every_test_named_in_reliability_md_exists():
    text = (REPO / "docs" / "reliability.md").read_text()
    cited = re.findall(r"`(tests/[\w/]+\.py)((?:::\w+)?)`", text)
    cited += [("", f"::{name}") for name in re.findall(r"`::(test_\w+)`", text)]
    assert len(cited) >= 20
    defined: dict[str, set[str]] = {}
    for path in REPO.glob("tests/**/test_*.py"):
        tree = ast.parse(path.read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        defined[str(path.relative_to(REPO))] = names
    every = set().union(*defined.values())
    for path, test in cited:
        if path:
            assert path in defined, f"{path} does not exist"
        if test:
            where = defined[path] if path else every
            assert test.removeprefix("::") in where, f"{path}{test} does not exist"
