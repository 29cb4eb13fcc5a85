"""Reading params.yaml into Params: strict YAML (no duplicate keys, no alias bombs, no values
Python cannot use), --set overrides, and the checks that need the whole tree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from pipelines.errors import ParamsError
from pipelines.params import ClusterParams, Params


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply `section.key=value` to a nested dict; the value is parsed as YAML (numbers, lists)."""
    if "=" not in assignment:
        raise ParamsError(f"override {assignment!r} must look like section.key=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ParamsError(f"override {assignment!r} has an empty key")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ParamsError(f"override {assignment!r}: {k} is not a section")
    try:
        value = yaml.load(raw, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except ParamsError as exc:
        raise ParamsError(f"override {assignment!r}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ParamsError(
            f"override {assignment!r}: value is not valid YAML ({_yaml_problem(exc)}); quote "
            "strings, close brackets"
        ) from exc
    _check_expansion(value, f"override {assignment!r}")
    node[keys[-1]] = value


# Aliases (*a) share one object, so a few lines of YAML can stand for billions of values (the
# "billion laughs"); anything that walks the tree would then run for hours. No params tree
# needs more than a few thousand values.
MAX_VALUES = 100_000


def _check_expansion(tree: Any, where: str) -> None:
    """Refuse a tree whose aliases expand past MAX_VALUES values, or that contains itself."""
    sizes: dict[int, int] = {}
    open_ids: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, dict | list):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_ids:
            raise ParamsError(f"{where}: a YAML alias refers to itself; write the value out")
        open_ids.add(key)
        children = node.values() if isinstance(node, dict) else node
        total = 1 + sum(size(child) for child in children)
        open_ids.discard(key)
        if total > MAX_VALUES:
            raise ParamsError(
                f"{where}: its YAML aliases expand to more than {MAX_VALUES:,} values; write "
                "the settings out instead of nesting aliases"
            )
        sizes[key] = total
        return total

    size(tree)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error as 'line L, column C: problem' (its first line alone names neither)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or type(exc).__name__
    if "\\t" in problem:  # PyYAML writes the tab as backslash-t
        problem += " (YAML indents with spaces, never tabs)"
    return problem if mark is None else f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses what safe_load silently accepts: a repeated key (the last one won,
    dropping a whole section), keys that are not strings, and `<<` merge keys (a merged key
    that a section's own key overrides is another silent choice)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise ParamsError(
                    f"line {line}: '<<' merge keys are not read in params files; write the "
                    "settings out in the section, or use --set / --preset for variations"
                )
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise ParamsError(
                    f"line {line}: key {key!r} is not a name; params keys are words such as "
                    "data or shard_size"
                )
            if key in seen:
                raise ParamsError(
                    f"line {line}: {key!r} appears twice in one section, and only one would be "
                    "used; merge them"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_params_file(path: Path) -> dict[str, Any]:
    """The raw sections of a params file, refusing anything it cannot mean one way."""
    try:
        tree = yaml.load(path.read_text(), Loader=_StrictLoader) or {}  # noqa: S506 - SafeLoader
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsError(f"cannot read params file {path}: {exc}") from exc
    _check_expansion(tree, str(path))
    if not isinstance(tree, dict):
        raise ParamsError(f"{path} must hold a mapping of sections (data, model, train, ...)")
    return tree


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] = ()) -> Params:
    """Read the params file (None: built-in defaults), apply overrides, validate everything."""
    tree: dict[str, Any] = {}
    root = Path.cwd()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ParamsError(
                f"params file {path} is a directory, not a file; pass a params file with "
                "--params (or rename that folder)"
            )
        if not path.is_file():
            raise ParamsError(f"params file {path} not found; pass --params with an existing file")
        tree = read_params_file(path)
        root = path.resolve().parent
    for assignment in overrides:
        apply_override(tree, assignment)
    _refuse_unusable(tree, "")
    _refuse_moved_keys(tree)
    if "root" in tree:  # internal: the folder of the params file, never a setting
        raise ParamsError(
            "params: root is not a setting (paths are relative to the params file's folder); "
            "remove it, or move the params file"
        )
    try:
        params = Params(**tree, root=root)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        got = err.get("input")
        # A whole section's check (a rule between its keys) names the keys itself.
        shown = "" if isinstance(got, dict) else f" (got {_short(got)})"
        msg = err["msg"].removeprefix("Value error, ")
        raise ParamsError(f"params: {where}: {msg}{shown}; fix params.yaml or --set") from exc
    _check_written_paths(params)
    return params


# Settings that moved section; an old params file names them at their old place.
_MOVED = {f"train.{k}": f"cluster.{k}" for k in ClusterParams.model_fields if k != "address"}
_MOVED["train.ray_address"] = "cluster.address"


def _refuse_moved_keys(tree: dict[str, Any]) -> None:
    train = tree.get("train")
    for key in train if isinstance(train, dict) else ():
        new = _MOVED.get(f"train.{key}")
        if new:
            raise ParamsError(
                f"params: train.{key} is now {new} (Ray settings have their own section, "
                f"cluster:); move it there in params.yaml or --set {new}=..."
            )


# No setting needs an integer past float64's exact range; torch and numpy overflow on them.
MAX_INT = 2**53


def _refuse_unusable(node: Any, where: str) -> None:
    """A NUL byte cannot be in a path or a name (the OS would reject it deep inside a stage);
    an integer past 2**53 is no count, size or seed anything downstream can hold."""
    if isinstance(node, dict):
        for k, v in node.items():
            _refuse_unusable(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for v in node:
            _refuse_unusable(v, where)
    elif isinstance(node, str) and "\x00" in node:
        raise ParamsError(f"params: {where} holds a NUL byte; remove it")
    elif isinstance(node, int) and not isinstance(node, bool) and abs(node) > MAX_INT:
        raise ParamsError(f"params: {where} is {_short(node)}, too large; use at most 2**53")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_written_paths(params: Params) -> None:
    """Folders that stages write into whole may be neither the workspace nor a parent of it."""
    from pipelines.guards import check_not_workspace

    check_not_workspace(params.resolve(params.outputs_dir), params.root, "outputs_dir")
    if "://" not in params.cluster.storage_path:
        check_not_workspace(
            params.resolve(params.cluster.storage_path), params.root, "cluster.storage_path"
        )
