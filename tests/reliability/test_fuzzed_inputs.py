"""Bad input generated rather than listed (hypothesis): params overrides, input arrays and paths.

The table in test_bad_inputs.py holds the cases someone thought of; these strategies find the
ones nobody did. Every generated input must end as a result (exit 0) or as exactly one
`error:` line with exit 2: never a traceback, never the "unexpected ... bug" line (exit 1), and
never a changed workspace file or registry entry.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipelines.cli import main
from pipelines.errors import PipelineError
from pipelines.params import Params
from pipelines.params_file import load_params
from tests.reliability.conftest import Workspace
from vae.errors import VAEError

# Every example runs the real command line in-process: a few dozen per property keep the
# whole module within seconds while still reaching well past the hand-written table.
CLI_RUNS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # CI runs the same examples every time; a failure reproduces
)

# -- values and keys ------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
yaml_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _known_keys() -> list[str]:
    """section.key for every setting (and a few nested ones), from the schema itself."""
    keys: list[str] = []
    for section, field in Params.model_fields.items():
        name = field.alias or section
        sub = getattr(field.annotation, "model_fields", None)
        if sub is None:
            keys.append(name)
            continue
        keys += [f"{name}.{k}" for k in sub]
    return [k for k in keys if k != "root"] + ["model.noise.gaussian_std", "model.noise.mask_prob"]


KNOWN = _known_keys()
keys = st.one_of(
    st.sampled_from(KNOWN),
    st.builds(
        lambda k, extra: f"{k}.{extra}", st.sampled_from(KNOWN), st.text(min_size=1, max_size=5)
    ),
    st.text(min_size=1, max_size=15),
)


def _override(key: str, value: object) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


overrides = st.lists(st.builds(_override, keys, yaml_values), min_size=1, max_size=3)


def _one_line(code: int, err: str) -> None:
    assert code in (0, 2), f"exit {code}: {err}"
    if code == 2:
        assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err


# -- params -------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None, derandomize=True)
@given(overrides)
def test_any_override_is_either_valid_params_or_one_params_error(tmp_path_factory, sets):
    """load_params is the door every command goes through: whatever the override, the
    answer is a Params or a one-line ParamsError (PipelineError), nothing else."""
    try:
        params = load_params(None, sets)
    except PipelineError as exc:
        assert str(exc) and "Traceback" not in str(exc)
        return
    assert isinstance(params, Params)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.builds(_override, st.sampled_from([k for k in KNOWN if k.startswith("model.")]), yaml_values), min_size=1, max_size=3))  # fmt: skip
def test_any_model_setting_is_a_config_or_one_library_error(sets):
    """Values params accept may still not make a model: the library says so as a VAEError."""
    try:
        params = load_params(None, sets)
    except PipelineError:
        return
    try:
        params.model.to_config((1, 8, 8))
    except VAEError as exc:
        assert str(exc)


@CLI_RUNS
@given(sets=overrides)
def test_generated_bad_params_through_the_cli_are_one_line_and_change_nothing(
    workspace: Workspace, capsys, sets
):
    try:
        workspace.params(*sets)
    except PipelineError:
        pass
    else:
        assume(False)  # valid settings would start real training: not this test's business
    _assert_refused(workspace, capsys, ["train", *itertools.chain(*(("--set", s) for s in sets))])


# -- raw text: YAML syntax, anchors and aliases, unicode, huge numbers ------------------------

_yaml_bits = st.sampled_from(
    ["&a ", "*a", "[", "]", "{", "}", ", ", ": ", "- ", "!!python/object ", "!!binary ", "\t",
     "\n", "'", '"', "#", "|", ">", "%", "@", "`", "~", "null", "1e400", "9" * 30, "-0x1F",
     ".inf", ".nan", "<<: *a", "\x00", "\u202e", "é", "💥", "\\"]
)  # fmt: skip
raw_values = st.lists(st.one_of(_yaml_bits, st.text(max_size=4)), max_size=8).map("".join)


def _alias_chain(levels: int, width: int) -> str:
    """A flow-style 'billion laughs' of the given depth and fan-out."""
    parts = ["[&a0 [x, x]"]
    for i in range(1, levels):
        parts.append(f", &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "".join(parts) + "]"


@settings(max_examples=300, deadline=None, derandomize=True)
@given(key=st.sampled_from(KNOWN), raw=raw_values)
def test_any_raw_override_text_is_params_or_one_params_error(key, raw):
    """The text after `=` as a user might type it, not as a YAML dumper writes it."""
    try:
        params = load_params(None, [f"{key}={raw}"])
    except PipelineError as exc:
        assert str(exc) and "\n" not in str(exc) and "Traceback" not in str(exc)
        return
    assert isinstance(params, Params)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(levels=st.integers(1, 12), width=st.integers(1, 12))
def test_aliases_of_any_depth_are_read_or_refused_in_a_second(levels, width):
    import time

    started = time.monotonic()
    try:
        load_params(None, [f"model.hidden={_alias_chain(levels, width)}"])
    except PipelineError as exc:
        assert "\n" not in str(exc)
    assert time.monotonic() - started < 2


@settings(max_examples=200, deadline=None, derandomize=True)
@given(text=st.lists(st.one_of(_yaml_bits, st.text(max_size=6)), max_size=12).map("".join))
def test_any_params_file_text_is_params_or_one_params_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    try:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    except UnicodeEncodeError:
        assume(False)
    try:
        params = load_params(path)
    except PipelineError as exc:
        assert str(exc) and "\n" not in str(exc) and "Traceback" not in str(exc)
        return
    assert isinstance(params, Params)


@CLI_RUNS
@given(key=st.sampled_from(KNOWN), raw=raw_values)
def test_raw_override_text_through_the_cli_is_one_line_and_changes_nothing(
    workspace: Workspace, capsys, key, raw
):
    try:
        workspace.params(f"{key}={raw}")
    except PipelineError:
        pass
    else:
        assume(False)  # valid settings would start real training: not this test's business
    _assert_refused(workspace, capsys, ["train", "--set", f"{key}={raw}"])


def _assert_refused(workspace: Workspace, capsys, argv: list[str]) -> tuple[int, str]:
    files, registry = workspace.files(), workspace.registry()
    capsys.readouterr()
    code = main([*argv, "--params", str(workspace.params_file), "--quiet"])
    err = capsys.readouterr().err.strip()
    _one_line(code, err)
    assert workspace.files() == files, "a workspace file changed"
    assert workspace.registry() == registry, "the registry changed"
    return code, err


# -- arrays -------------------------------------------------------------------------------

_names = itertools.count()
_dtypes = st.sampled_from(
    ["bool", "int8", "uint8", "int64", "float16", "float32", "float64", "complex64", "<U3", "O"]
)
_shapes = st.lists(st.integers(0, 9), min_size=0, max_size=5).map(tuple)


@st.composite
def arrays(draw) -> np.ndarray:
    shape, dtype = draw(_shapes), draw(_dtypes)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    size = int(np.prod(shape)) if shape else 1
    if dtype == "O":
        return np.array([None] * size, dtype=object).reshape(shape)
    if dtype == "<U3":
        return np.full(shape, "ab", dtype="<U3")
    scale = draw(st.sampled_from([1.0, 255.0, 1e6, -1.0, float("nan")]))
    with np.errstate(all="ignore"):  # out-of-range casts are part of what is generated
        return (rng.random(size) * scale).reshape(shape).astype(dtype)


@CLI_RUNS
@given(x=arrays(), container=st.sampled_from(["npy", "npz-x", "npz-other", "garbage"]))
def test_generated_arrays_stage_or_fail_in_one_line(workspace, tmp_path, capsys, x, container):
    path = tmp_path / f"in-{next(_names)}"
    if container == "npy":
        path = path.with_suffix(".npy")
        np.save(path, x, allow_pickle=True)
    elif container == "garbage":
        path = path.with_suffix(".npy")
        path.write_bytes(x.tobytes()[:64] if x.dtype != object else b"\x93NUMPY?")
    else:
        path = path.with_suffix(".npz")
        np.savez(path, **{"x" if container == "npz-x" else "images": x}, allow_pickle=True)
    shards = tmp_path / f"shards-{path.stem}"
    code, err = _assert_refused(workspace, capsys, [
        "stage", "--set", "data.source=array", "--set", f"data.path={path}",
        "--set", f"data.shards_dir={shards}",
    ])  # fmt: skip
    if code == 0:
        assert (shards / "manifest.json").is_file()


# -- paths --------------------------------------------------------------------------------


def _dangerous_paths(ws: Workspace, tmp: Path) -> dict[str, str]:
    """Places no command may write over: the workspace, its parents, its repository folders,
    other people's files and folders, and names the file system cannot hold."""
    foreign = tmp / "theirs"
    foreign.mkdir(exist_ok=True)
    (foreign / "notes.txt").write_text("mine")
    (tmp / "file.txt").write_text("mine")
    return {
        "workspace": str(ws.root),
        "parent": str(ws.root.parent),
        "dot": ".",
        "dotdot": "..",
        "data-folder": str(ws.root / "data"),
        "git": str(ws.root / ".git" / "x"),
        "foreign-folder": str(foreign),
        "file": str(tmp / "file.txt"),
        "under-a-file": str(tmp / "file.txt" / "sub" / "out"),
        "too-long": str(tmp / ("x" * 300)),
        "nul": str(tmp / "a\x00b"),
    }


_PATH_COMMANDS = {
    "stage": lambda p: ["stage", "--set", f"data.shards_dir={p}"],
    "outputs": lambda p: ["evaluate", "--set", f"outputs_dir={p}"],
    "storage": lambda p: ["train", "--set", f"cluster.storage_path={p}"],
    "generate": lambda p: ["generate", "-n", "4", "--out", f"{p}"],
    "embed": lambda p: ["embed", "--out", f"{p}"],
    "similar": lambda p: ["similar", "digits-00001", "--embeddings", f"{p}"],
}


_PLACES = ("workspace", "parent", "dot", "dotdot", "data-folder", "git", "foreign-folder",
           "file", "under-a-file", "too-long", "nul")  # fmt: skip


# A checkpoint run folder may be made inside an existing folder: that replaces nothing.
_ALLOWED = {("data-folder", "storage"), ("foreign-folder", "storage")}
_COMBINATIONS = [
    (place, command)
    for place in _PLACES
    for command in sorted(_PATH_COMMANDS)
    if (place, command) not in _ALLOWED
]


@pytest.mark.parametrize(("place", "command"), _COMBINATIONS)
def test_every_dangerous_path_is_refused_by_every_command_that_writes_or_reads_one(
    workspace, tmp_path, capsys, place, command
):
    _check_path(workspace, tmp_path, capsys, place, command, "")


@CLI_RUNS
@given(
    place=st.sampled_from(
        [
            "workspace",
            "parent",
            "dot",
            "dotdot",
            "data-folder",
            "git",
            "foreign-folder",
            "file",
            "under-a-file",
            "too-long",
            "nul",
        ]
    ),  # fmt: skip
    command=st.sampled_from(sorted(_PATH_COMMANDS)),
    suffix=st.sampled_from(["", "/", "/../.."]),
)
def test_generated_dangerous_paths_are_refused_in_one_line(
    workspace, tmp_path, capsys, place, command, suffix
):
    assume((place, command) not in _ALLOWED)
    _check_path(workspace, tmp_path, capsys, place, command, suffix)


def _check_path(workspace, tmp_path, capsys, place: str, command: str, suffix: str) -> None:
    path = _dangerous_paths(workspace, tmp_path)[place] + suffix
    foreign_before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, err = _assert_refused(workspace, capsys, _PATH_COMMANDS[command](path))
    assert code == 2, f"{command} wrote to {path!r}: {err}"
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == foreign_before
