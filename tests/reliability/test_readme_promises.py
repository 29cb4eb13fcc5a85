"""README.md is a promise too: every command its shell blocks show, and every behaviour it
describes, is a row of RELIABILITY.md's "README promises and commands" table naming the test
that fails if it breaks. Reads two files; starts nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SECTION = "## README promises and commands, and the tests that hold them"
SHELL = {"bash", "sh", "shell", "console"}
CITATION = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")
BENCHMARK = re.compile(r"measured by `?(benchmarks/\w+\.py)`? \(on demand\)")
NOT_IN_CI = "not run in CI: "
# The only commands that may be "not run in CI", each for a reason CI cannot meet.
NEEDS_WHAT_CI_LACKS = {
    "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 --index-url <pytorch CUDA index>":
        "PyTorch's CUDA wheel index (the network) and a GPU",
}  # fmt: skip


def _normalise(command: str) -> str:
    """One command as the table writes it: no trailing comment, single spaces."""
    command = re.sub(r"(^|\s)#(\s.*)?$", "", command.strip())
    return " ".join(command.split())


def readme_command_lines(text: str | None = None) -> list[str]:
    """Every command line in README.md's shell code blocks (and `$ ` lines in any block)."""
    text = (REPO / "README.md").read_text() if text is None else text
    commands, fence = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = stripped[3:].strip().lower() if fence is None else None
            continue
        if fence is None:
            continue
        if stripped.startswith("$ "):
            stripped = stripped[2:]
        elif fence not in SHELL:
            continue
        command = _normalise(stripped)
        if command:
            commands.append(command)
    return commands


def table_rows() -> list[tuple[str, str, str]]:
    """(README section, promise or command, test) for each row of the section's table."""
    text = (REPO / "RELIABILITY.md").read_text()
    assert SECTION in text, f"RELIABILITY.md has no section {SECTION!r}"
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in body.splitlines():
        if not line.startswith("|") or set(line) <= set("|- "):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        assert len(cells) == 3, f"a row needs three cells: {line}"
        if cells[0] == "README section":
            continue
        rows.append((cells[0], cells[1].replace("\\|", "|"), cells[2]))
    return rows


def command_of(cell: str) -> str | None:
    """The command a row maps, when its middle cell is one code span and nothing else."""
    match = re.fullmatch(r"`([^`]+)`", cell)
    return _normalise(match.group(1)) if match else None


def _defined_tests() -> dict[str, set[str]]:
    defined = {}
    for path in REPO.glob("tests/**/test_*.py"):
        tree = ast.parse(path.read_text())
        defined[str(path.relative_to(REPO))] = {
            n.name for n in tree.body if isinstance(n, ast.FunctionDef)
        }
    return defined


def test_the_readme_parser_finds_the_commands_of_each_kind_of_block():
    text = "```bash\nmake test   # all\n# a comment\n```\n```\n$ vae-pipeline --help\nout\n```\n"
    assert readme_command_lines(text) == ["make test", "vae-pipeline --help"]
    commands = readme_command_lines()
    assert len(commands) >= 30 and "dvc pull data.dvc || vae-pipeline stage" in commands


def test_every_readme_command_is_a_row_of_the_table():
    mapped = {command_of(cell) for _, cell, _ in table_rows()} - {None}
    missing = [c for c in readme_command_lines() if c not in mapped]
    assert not missing, f"README commands without a row in RELIABILITY.md: {missing}"
    stale = sorted(mapped - set(readme_command_lines()))
    assert not stale, f"rows for commands README.md no longer shows: {stale}"


def test_every_readme_section_with_promises_has_rows():
    readme = (REPO / "README.md").read_text()
    sections = set(re.findall(r"^#{2,3} (.+)$", readme, re.M))
    used = {section for section, _, _ in table_rows()}
    assert used <= sections, f"rows name sections README.md lacks: {sorted(used - sections)}"
    assert len(used) >= 12 and len(table_rows()) >= 80


def test_every_row_names_an_existing_test_or_says_why_it_cannot_run_in_ci():
    defined = _defined_tests()
    for section, promise, cell in table_rows():
        row = f"{section} | {promise}"
        for path, test in CITATION.findall(cell):
            assert path in defined, f"{row}: {path} does not exist"
            assert test in defined[path], f"{row}: {path}::{test} does not exist"
        for script in BENCHMARK.findall(cell):
            assert (REPO / script).is_file(), f"{row}: {script} does not exist"
        if NOT_IN_CI in cell:
            command = command_of(promise)
            assert command in NEEDS_WHAT_CI_LACKS, f"{row}: only {list(NEEDS_WHAT_CI_LACKS)}"
            assert NEEDS_WHAT_CI_LACKS[command] in cell, row
        assert CITATION.search(cell) or BENCHMARK.search(cell) or NOT_IN_CI in cell, (
            f"{row}: the test cell names no test (`tests/...py::test_name`), no benchmark "
            f"('measured by benchmarks/X.py (on demand)') and no reason it cannot run in CI"
        )
