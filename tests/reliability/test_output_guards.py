"""What the downstream commands write, and what they read back: generate's PNG, embed's Parquet
and sidecar, evaluate's metrics and figures, similar's embeddings.

Every refusal goes through the `vae-pipeline` command line against the shared workspace: exit
code 2, exactly one `error:` line naming the problem, every workspace file byte-identical and
the registry as it was. Output checks run with MLflow unreachable, which proves they come before
the model is pulled (that would fail with "unreachable" instead). Read-only folders are real
read-only mounts in a private mount namespace, since root ignores permission bits.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.cli import main
from pipelines.evaluation import figures
from pipelines.jobs.embed import is_ours as parquet_is_ours
from tests.helpers.mounts import cli_on_read_only
from tests.reliability.conftest import Workspace
from tests.servers import closed_port

Args = Callable[[Workspace, Path], list[str]]
RERUN_EMBED = "re-run 'vae-pipeline embed'"


@dataclass(frozen=True)
class Case:
    id: str
    args: Args  # (workspace, scratch folder) -> the command line after `vae-pipeline`
    names: tuple[str, ...]  # the error line must contain each


def _offline(*argv: str) -> Args:
    """argv with MLflow unreachable: a check that passes it ran before the model was pulled."""
    return lambda ws, tmp: [
        *[a.replace("{tmp}", str(tmp)) for a in argv],
        "--set",
        f"mlflow.tracking_uri=http://127.0.0.1:{closed_port()}",
    ]


def _prepared(prepare: Callable[[Path], None], *argv: str) -> Args:
    def args(ws: Workspace, tmp: Path) -> list[str]:
        prepare(tmp)
        return _offline(*argv)(ws, tmp)

    return args


def _folder(name: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).mkdir()


def _file(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).write_bytes(content)


def _foreign_png(tmp: Path) -> None:
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp / "holiday.png")


def _parquet(name: str, table: pa.Table) -> Callable[[Path], None]:
    return lambda tmp: pq.write_table(table, tmp / name)


def _embeddings(**columns: pa.Array) -> pa.Table:
    return pa.table({"key": pa.array(["a", "b"]), **columns})


def _similar(name: str, prepare: Callable[[Path], None], *more: str) -> Args:
    def args(ws: Workspace, tmp: Path) -> list[str]:
        prepare(tmp)
        return ["similar", "a", "--embeddings", str(tmp / name), *more]

    return args


def _array(x: np.ndarray) -> Args:
    def args(ws: Workspace, tmp: Path) -> list[str]:
        np.save(tmp / "x.npy", x, allow_pickle=x.dtype == object)
        return ["embed", "--source", str(tmp / "x.npy"), "--out", str(tmp / "e.parquet")]

    return args


def two_shard_copy(ws: Workspace, dst: Path) -> Path:
    """The first train and test shards of the workspace with a manifest listing only them:
    valid shards of another data version, small enough for a quick embed."""
    manifest = json.loads((ws.shards / "manifest.json").read_text())
    dst.mkdir()
    for split in ("train", "val", "test"):
        entry = manifest["splits"][split]
        entry["shards"] = entry["shards"][:1] if split != "val" else []
        entry["samples"] = sum(e["samples"] for e in entry["shards"])
        for e in entry["shards"]:
            shutil.copy(ws.shards / e["name"], dst / e["name"])
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


def _other_data_version(ws: Workspace, tmp: Path) -> list[str]:
    shards = two_shard_copy(ws, tmp / "shards")
    return ["embed", "--source", str(shards), "--out", str(tmp / "e.parquet")]


CASES = [
    # -- generate: counts and --out ----------------------------------------------------------
    Case(
        "generate-too-many-images",
        _offline("generate", "-n", "5000"),
        ("-n must be between 1 and 4096",),
    ),
    Case("generate-negative-count", _offline("generate", "-n", "-3"), ("-n",)),
    Case(
        "generate-out-jpeg",
        _offline("generate", "--out", "{tmp}/samples.jpg"),
        ("samples.jpg", "must end in .png"),
    ),
    Case(
        "generate-out-without-suffix",
        _offline("generate", "--out", "{tmp}/samples"),
        ("must end in .png",),
    ),
    Case(
        "generate-out-is-a-folder",
        _prepared(_folder("grid.png"), "generate", "--out", "{tmp}/grid.png"),
        ("grid.png is a folder",),
    ),
    Case(
        "generate-out-parent-is-a-file",
        _prepared(_file("notes", b"mine"), "generate", "--out", "{tmp}/notes/grid.png"),
        ("notes is a file",),
    ),
    Case(
        "generate-out-is-someone-elses-png",
        _prepared(_foreign_png, "generate", "--out", "{tmp}/holiday.png"),
        ("holiday.png exists and was not written by vae-pipeline",),
    ),
    Case(
        "generate-out-is-text-named-png",
        _prepared(_file("a.png", b"hello"), "generate", "--out", "{tmp}/a.png"),
        ("a.png exists and was not written by vae-pipeline",),
    ),
    # -- embed: --out and its sidecar ----------------------------------------------------------
    Case(
        "embed-out-csv",
        _offline("embed", "--out", "{tmp}/e.csv"),
        ("e.csv", "must end in .parquet"),
    ),
    Case(
        "embed-out-is-a-folder",
        _prepared(_folder("e.parquet"), "embed", "--out", "{tmp}/e.parquet"),
        ("e.parquet is a folder",),
    ),
    Case(
        "embed-out-parent-is-a-file",
        _prepared(_file("notes", b"mine"), "embed", "--out", "{tmp}/notes/e.parquet"),
        ("notes is a file",),
    ),
    Case(
        "embed-out-is-someone-elses-parquet",
        _prepared(
            _parquet("e.parquet", _embeddings(mu=pa.array([[1.0], [2.0]]))),
            "embed",
            "--out",
            "{tmp}/e.parquet",
        ),
        ("e.parquet exists and was not written by vae-pipeline",),
    ),
    Case(
        "embed-out-is-random-bytes",
        _prepared(_file("e.parquet", b"\x00" * 100), "embed", "--out", "{tmp}/e.parquet"),
        ("e.parquet exists and was not written by vae-pipeline",),
    ),
    Case(
        "embed-sidecar-is-someone-elses-json",
        _prepared(_file("e.json", b'{"mine": 1}'), "embed", "--out", "{tmp}/e.parquet"),
        ("sidecar e.json", "not written by vae-pipeline"),
    ),
    # -- embed: odd --source arrays and data of another version --------------------------------
    Case(
        "embed-source-not-an-array",
        _prepared(_file("x.npy", b"\x93NUMPY garbage"), "embed", "--source", "{tmp}/x.npy"),
        ("x.npy", "re-save it"),
    ),
    Case("embed-source-1d", _array(np.zeros(64, np.float32)), ("x.npy", "shape (64,)")),
    Case("embed-source-0d", _array(np.float32(0.5) * np.ones(())), ("x.npy", "shape ()")),
    Case("embed-source-flat-rows", _array(np.zeros((4, 64), np.float32)), ("shape (4, 64)",)),
    Case("embed-source-object-dtype", _array(np.array([None, 1], dtype=object)), ("x.npy",)),
    Case(
        "embed-source-colour-images",
        _array(np.zeros((4, 3, 8, 8), np.float32)),
        ("(3, 8, 8)", "expects (1, 8, 8)"),
    ),
    Case(
        "embed-source-text-file",
        _prepared(_file("x.txt", b"1 2 3"), "embed", "--source", "{tmp}/x.txt"),
        ("x.txt", "neither a staged shards folder nor a .npy/.npz file"),
    ),
    Case(
        "embed-shards-of-another-data-version",
        _other_data_version,
        ("was trained on data version", "embed.allow_other_data=true"),
    ),
    # -- similar: embeddings files embed did not write ----------------------------------------
    Case(
        "similar-random-bytes",
        _similar("e.parquet", _file("e.parquet", bytes(range(256)) * 4)),
        ("e.parquet", "not readable Parquet", RERUN_EMBED),
    ),
    Case(
        "similar-empty-file",
        _similar("e.parquet", _file("e.parquet", b"")),
        ("e.parquet", RERUN_EMBED),
    ),
    Case(
        "similar-embeddings-is-a-folder",
        _similar("e.parquet", _folder("e.parquet")),
        ("e.parquet is a folder", RERUN_EMBED),
    ),
    Case(
        "similar-parquet-without-mu",
        _similar("e.parquet", _parquet("e.parquet", _embeddings(z=pa.array([1.0, 2.0])))),
        ("no key/mu columns", RERUN_EMBED),
    ),
    Case(
        "similar-mu-of-text",
        _similar("e.parquet", _parquet("e.parquet", _embeddings(mu=pa.array(["1", "2"])))),
        ("column mu is string", RERUN_EMBED),
    ),
    Case(
        "similar-mu-lists-of-text",
        _similar("e.parquet", _parquet("e.parquet", _embeddings(mu=pa.array([["1"], ["2"]])))),
        ("column mu is list<element: string>, not lists of numbers", RERUN_EMBED),
    ),
    Case(
        "similar-mu-ragged",
        _similar("e.parquet", _parquet("e.parquet", _embeddings(mu=pa.array([[1.0], [1.0, 2.0]])))),
        ("different lengths", RERUN_EMBED),
    ),
    Case(
        "similar-mu-missing-a-row",
        _similar("e.parquet", _parquet("e.parquet", _embeddings(mu=pa.array([[1.0], None])))),
        ("missing", RERUN_EMBED),
    ),
    Case(
        "similar-mu-nan",
        _similar("e.parquet", _parquet("e.parquet", _embeddings(mu=pa.array([[1.0], [np.nan]])))),
        ("NaN", RERUN_EMBED),
    ),
    Case(
        "similar-keys-not-text",
        _similar(
            "e.parquet",
            _parquet("e.parquet", pa.table({"key": [1, 2], "mu": pa.array([[1.0], [2.0]])})),
        ),
        ("column key is int64", RERUN_EMBED),
    ),
    Case(
        "similar-too-many-neighbours",
        _similar(
            "e.parquet",
            _parquet("e.parquet", _embeddings(mu=pa.array([[1.0], [2.0]]))),
            "-k",
            "100000",
        ),  # fmt: skip
        ("-k must be between 1 and 10000",),
    ),
]


def test_the_output_guard_table_covers_every_downstream_command():
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.id.split("-")[0] for c in CASES} == {"generate", "embed", "similar"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_output_or_embeddings_is_one_line_exit_2_and_damages_nothing(
    case, workspace, tmp_path, capsys
):
    files, registry = workspace.files(), workspace.registry()
    argv = case.args(workspace, tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()

    code = main([*argv, "--params", str(workspace.params_file), "--quiet"])

    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for phrase in case.names:
        assert phrase in err, err
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "the command wrote or changed a file in the scratch folder"
    assert workspace.files() == files, "a workspace file changed"
    assert workspace.registry() == registry, "the registry changed"


def _run_ok(argv: list[str], ws: Workspace, capsys) -> dict:
    capsys.readouterr()
    code = main([*argv, "--params", str(ws.params_file), "--quiet", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_generate_overwrites_the_png_it_wrote_earlier(workspace, tmp_path, capsys):
    files = workspace.files()
    out = tmp_path / "grid.png"
    _run_ok(["generate", "-n", "4", "--seed", "1", "--out", str(out)], workspace, capsys)
    first = out.read_bytes()
    assert figures.is_ours(out)

    _run_ok(["generate", "-n", "9", "--seed", "2", "--out", str(out)], workspace, capsys)

    assert out.read_bytes() != first and figures.is_ours(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"], "a temp file was left"
    assert workspace.files() == files


def test_generate_draws_4096_images_as_one_png_of_bounded_size_in_seconds(
    workspace, tmp_path, capsys
):
    out = tmp_path / "many.png"
    start = time.monotonic()
    result = _run_ok(["generate", "-n", "4096", "--out", str(out)], workspace, capsys)
    assert time.monotonic() - start < 60
    assert result["n"] == 4096
    with Image.open(out) as img:
        width, height = img.size
    assert 1000 < width <= 2000 and 1000 < height <= 2100, img.size  # a 64 x 64 grid


def test_evaluate_write_failure_leaves_no_temp_file_and_is_one_line(workspace, tmp_path, capsys):
    """metrics.json is a folder: the write fails after the evaluation, as a full or broken
    disk would, and must leave neither a temporary file nor a traceback."""
    files, registry = workspace.files(), workspace.registry()
    out = tmp_path / "outputs"
    shutil.copytree(workspace.root / "outputs" / "train", out / "train")
    (out / "evaluate" / "metrics.json").mkdir(parents=True)
    capsys.readouterr()

    code = main(
        ["evaluate", "--set", f"outputs_dir={out}", "--params", str(workspace.params_file),
         "--quiet"]
    )  # fmt: skip

    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "metrics.json" in err, err
    assert sorted(p.name for p in (out / "evaluate").iterdir()) == ["metrics.json"]
    assert workspace.files() == files and workspace.registry() == registry


def test_every_figure_carries_the_vae_pipeline_png_metadata(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((6, 1, 8, 8))
    written = [
        figures.image_grid(x, tmp_path / "grid.png", "grid"),
        figures.reconstructions(x, x, tmp_path / "recon.png", n=3),
        figures.latent_projection(rng.random((20, 3)), np.arange(20) % 3, tmp_path / "lat.png"),
        figures.learning_curves(
            [{"epoch": 1, "train_loss": 2.0, "val_neg_elbo": 2.5}], tmp_path / "lc.png", "gaussian"
        ),
    ]
    assert all(figures.is_ours(p) for p in written)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)


@pytest.mark.slow
def test_embed_of_another_data_version_runs_when_allowed_and_overwrites_its_own_parquet(
    workspace, tmp_path, capsys, local_ray
):
    """The one Ray case: refused without embed.allow_other_data, written with it, and written
    again over its own earlier output."""
    files, registry = workspace.files(), workspace.registry()
    shards = two_shard_copy(workspace, tmp_path / "shards")
    out = tmp_path / "e.parquet"
    argv = ["embed", "--source", str(shards), "--out", str(out), "--set", "embed.concurrency=1"]
    capsys.readouterr()
    assert main([*argv, "--params", str(workspace.params_file), "--quiet"]) == 2
    assert "embed.allow_other_data" in capsys.readouterr().err

    allowed = [*argv, "--set", "embed.allow_other_data=true"]
    first = _run_ok(allowed, workspace, capsys)
    assert first["n_samples"] == sum(
        json.loads((shards / "manifest.json").read_text())["splits"][s]["samples"]
        for s in ("train", "val", "test")
    )
    assert parquet_is_ours(out)
    written = out.stat().st_mtime_ns
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["data_version_trained_on"] != sidecar["data"]["manifest_sha256"]

    again = _run_ok([*allowed, "--split", "test"], workspace, capsys)

    assert out.stat().st_mtime_ns != written
    assert pq.read_table(out).num_rows == again["n_samples"] < first["n_samples"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "e.parquet", "shards"]
    assert workspace.files() == files and workspace.registry() == registry


@pytest.mark.slow
def test_embed_shows_its_bar_and_not_the_error_line_ray_logs_for_every_actor_pool(
    workspace, tmp_path, capfd, local_ray
):
    """Ray's core worker writes "... has constructor arguments in the object store" (an E line)
    to the driver's descriptor 2 for every Ray Data actor pool (ray-project/ray#57733): nothing
    failed, so it stays in Ray's own log file; embed's bar and result still reach the user."""
    out = tmp_path / "e.parquet"
    argv = ["embed", "--out", str(out), "--set", "embed.concurrency=1"]
    capfd.readouterr()
    code = main([*argv, "--params", str(workspace.params_file)])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert "core_worker" not in captured.err and "object store" not in captured.err, captured.err
    assert "embed: 100%" in captured.err  # the bar, written while descriptor 2 was hidden
    assert f"output: {out}" in captured.out


@pytest.mark.slow
def test_embed_of_a_damaged_shard_is_one_line_naming_it_and_writes_nothing(
    workspace, tmp_path, capsys, local_ray
):
    """Embed reads each shard once, in its Ray tasks, and checks it there as the training
    loader does: a flipped byte (same size) is found by its SHA-256 inside Ray and comes back
    as our one line; a truncated shard is found from the listing before Ray starts."""
    shards = two_shard_copy(workspace, tmp_path / "shards")
    test_shard = next(shards.glob("test-*.tar.gz"))
    data = bytearray(test_shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    test_shard.write_bytes(bytes(data))
    out = tmp_path / "e.parquet"
    argv = ["embed", "--source", str(shards), "--out", str(out), "--set", "embed.concurrency=1",
            "--set", "embed.allow_other_data=true", "--params", str(workspace.params_file),
            "--json"]  # fmt: skip
    for damage in ("flipped", "truncated"):
        if damage == "truncated":
            test_shard.write_bytes(bytes(data[:100]))
        capsys.readouterr()
        assert main(argv) == 2
        result = json.loads(capsys.readouterr().out)
        why = "SHA-256 differs" if damage == "flipped" else "is truncated at byte 100"
        assert str(test_shard) in result["error"] and why in result["error"], result
        assert "\n" not in result["error"] and "Ray" not in result["error"], result
        assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # no table, no temp


# -- read-only folders: a real read-only mount in a private mount namespace --------------------


@pytest.fixture(scope="module")
def read_only_runs(workspace, tmp_path_factory) -> dict:
    """generate, embed and evaluate asked to write into a read-only folder, in one process."""
    ro = tmp_path_factory.mktemp("read-only")
    shutil.copytree(workspace.root / "outputs" / "train", ro / "train")  # evaluate reads it
    offline = ["--set", f"mlflow.tracking_uri=http://127.0.0.1:{closed_port()}"]
    cases = {
        "generate": ["generate", "--out", str(ro / "g.png"), *offline],
        "embed": ["embed", "--out", str(ro / "e.parquet"), *offline],
        "evaluate": ["evaluate", "--set", f"outputs_dir={ro}"],
    }
    files, registry = workspace.files(), workspace.registry()
    result = cli_on_read_only(ro, workspace.params_file, cases)
    result["workspace_unchanged"] = workspace.files() == files
    result["registry_unchanged"] = workspace.registry() == registry
    return result


@pytest.mark.parametrize("command", ["generate", "embed", "evaluate"])
def test_output_folder_on_a_read_only_mount_is_one_line_exit_2_before_any_work(
    read_only_runs, command
):
    run = read_only_runs[command]
    assert run["code"] == 2, run["err"]
    assert run["err"].startswith("error: ") and "\n" not in run["err"], run["err"]
    assert "cannot write in" in run["err"], run["err"]
    assert "read-only file system" in run["err"].lower(), run["err"]
    assert read_only_runs["entries"] == ["train"], "nothing written, no temporary file left"
    assert read_only_runs["workspace_unchanged"] and read_only_runs["registry_unchanged"]
