"""Bad input, table-driven: every case goes through the `vae-pipeline` command line against a
complete workspace (shards + data.dvc, trained model, checkpoint, champion pair in MLflow).

Each must end with exit code 2 and exactly one line on stderr that names the problem, and must
leave every file of the workspace byte-identical and the registry (versions, aliases) as it was.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli import main
from tests.reliability.conftest import Workspace
from tests.servers import closed_port

Args = Callable[[Workspace, Path], list[str]]


@dataclass(frozen=True)
class Case:
    id: str
    args: Args  # (workspace, scratch folder) -> the command line after `vae-pipeline`
    names: str  # the error line must contain this (what is wrong, or the thing named)


# -- inputs the cases build in their scratch folder ---------------------------------------------


def _array(tmp: Path, x: np.ndarray, name: str = "x.npy") -> str:
    path = tmp / name
    np.save(path, x, allow_pickle=x.dtype == object)
    return str(path)


def _digits_like(n: int = 40) -> np.ndarray:
    return np.random.default_rng(0).random((n, 8, 8), dtype=np.float32)


def _with(value: float) -> np.ndarray:
    x = _digits_like()
    x[7, 3, 3] = value
    return x


# Tiny inputs all in one split and shard, so that what is wrong with their content is what
# staging reports (not that a split got fewer samples than it needs shards).
_ONE_SPLIT = [
    "--set", "data.val_fraction=0", "--set", "data.test_fraction=0",
    "--set", "data.min_shards_per_split=1", "--set", "cluster.num_workers=1",
]  # fmt: skip


def _stage_array(x: np.ndarray) -> Args:
    return lambda ws, tmp: [
        "stage",
        "--set",
        "data.source=array",
        "--set",
        f"data.path={_array(tmp, x)}",
        *_ONE_SPLIT,
    ]


def _image_folder(files: dict[str, bytes | None]) -> Args:
    """A folder of images (None => a real 8x8 PNG) staged into the workspace's shards."""

    def args(ws: Workspace, tmp: Path) -> list[str]:
        from PIL import Image

        folder = tmp / "images"
        folder.mkdir()
        for name, content in files.items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if content is None:
                Image.fromarray(np.full((8, 8), 128, np.uint8)).save(path)
            else:
                path.write_bytes(content)
        return ["stage", "--set", "data.source=images", "--set", f"data.path={folder}", *_ONE_SPLIT]

    return args


def _damaged_shards(damage: Callable[[Path], None], command: str) -> Args:
    """A copy of the staged shards with one shard damaged; the command reads the copy."""

    def args(ws: Workspace, tmp: Path) -> list[str]:
        copy = tmp / "shards"
        shutil.copytree(ws.shards, copy)
        damage(copy)
        return [command, "--set", f"data.shards_dir={copy}"]

    return args


def _truncate(split: str, size: int | None) -> Callable[[Path], None]:
    def damage(shards: Path) -> None:
        shard = sorted(shards.glob(f"{split}-*.tar.gz"))[0]
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2 if size is None else size])

    return damage


def _flip_byte(shards: Path) -> None:
    shard = sorted(shards.glob("test-*.tar.gz"))[0]
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))


def _foreign_model_folder(ws: Workspace, tmp: Path) -> list[str]:
    (tmp / "model").mkdir()
    (tmp / "model" / "notes.txt").write_text("mine")
    return ["quickstart", "--out", str(tmp)]


def _foreign_record(ws: Workspace, tmp: Path) -> list[str]:
    (tmp / "summary.json").write_text('{"mine": true}')
    return ["stage", "--record", str(tmp / "summary.json")]


def _train(*sets: str) -> Args:
    return lambda ws, tmp: ["train", *[x for s in sets for x in ("--set", s)]]


CASES = [
    # -- data sources ------------------------------------------------------------------------
    Case("array-nan-pixel", _stage_array(_with(np.nan)), "contains NaN"),
    Case("array-inf-pixel", _stage_array(_with(np.inf)), "contains inf"),
    Case("array-values-outside-0-1", _stage_array(_with(3.0)), "[0, 1]"),
    Case("array-wrong-shape-1d", _stage_array(np.zeros(64, np.float32)), "x.npy"),
    Case("array-wrong-shape-5d", _stage_array(np.zeros((4, 1, 1, 8, 8), np.float32)), "x.npy"),
    Case("array-object-dtype", _stage_array(np.array([None, 1], dtype=object)), "x.npy"),
    Case(
        "array-file-missing",
        lambda ws, tmp: ["stage", "--set", "data.source=array", "--set", f"data.path={tmp}/no.npy"],
        "no.npy",
    ),
    Case(
        "array-without-path",
        lambda ws, tmp: ["stage", "--set", "data.source=array"],
        "data.path",
    ),
    Case("images-empty-folder", _image_folder({}), "holds no PNG/JPEG"),
    Case("images-non-image-file", _image_folder({"a.png": None, "notes.txt": b"hi"}), "notes.txt"),
    Case("images-unreadable", _image_folder({"a.png": None, "b.png": b"\x89PNG broken"}), "b.png"),
    Case(
        "images-duplicate-keys",
        _image_folder({"x.y.png": None, "x_y.png": None}),
        "same sample key",
    ),
    Case(
        "images-folder-missing",
        lambda ws, tmp: ["stage", "--set", "data.source=images", "--set", f"data.path={tmp}/no"],
        "not found",
    ),
    Case(
        "mnist-offline",
        lambda ws, tmp: [
            "stage",
            "--set",
            "data.source=mnist",
            "--set",
            f"data.cache_dir={tmp}/raw",
            "--set",
            f"data.download_url=http://127.0.0.1:{closed_port()}/",
        ],  # fmt: skip
        "mnist",
    ),
    # -- params and the command line ----------------------------------------------------------
    Case("negative-shard-size", _train("data.shard_size=-5"), "data.shard_size"),
    Case("negative-image-size", _train("data.image_size=[-8, 8]"), "data.image_size"),
    Case("zero-epochs", _train("train.epochs=0"), "train.epochs"),
    Case("zero-ray-workers", _train("cluster.num_workers=0"), "cluster.num_workers"),
    Case(
        "unknown-likelihood",
        _train("model.likelihood=poisson"),
        "model.likelihood: Input should be 'gaussian' or 'bernoulli'",
    ),
    Case("latent-larger-than-input", _train("model.latent_dim=100"), "latent_dim 100"),
    Case("latent-zero", _train("model.latent_dim=0"), "latent_dim"),
    Case("negative-beta", _train("model.kind=beta_vae", "model.beta=-1"), "beta"),
    Case("unknown-param-key", _train("train.epoch=3"), "train.epoch"),
    Case("override-without-equals", _train("train.epochs"), "train.epochs"),
    Case("override-bad-yaml", _train("model.hidden=[32"), "model.hidden"),
    Case(
        "params-file-missing",
        lambda ws, tmp: ["train", "--params", str(tmp / "nope.yaml")],
        "nope.yaml",
    ),
    Case(
        "bernoulli-on-grey-values",
        lambda ws, tmp: ["quickstart", "--set", "model.likelihood=bernoulli", "--out", str(tmp)],
        "binar",
    ),
    Case(
        "mlflow-unreachable",
        lambda ws, tmp: _train(f"mlflow.tracking_uri=http://127.0.0.1:{closed_port()}")(ws, tmp),
        "unreachable",
    ),
    # -- shards ---------------------------------------------------------------------------------
    Case("zero-size-shard", _damaged_shards(_truncate("train", 0), "train"), "train-000000.tar.gz"),
    Case(
        "truncated-shard",
        _damaged_shards(_truncate("test", None), "evaluate"),
        "test-000000.tar.gz",
    ),
    Case("corrupt-shard", _damaged_shards(_flip_byte, "register"), "test-000000.tar.gz"),
    Case(
        "shards-missing",
        lambda ws, tmp: ["train", "--set", f"data.shards_dir={tmp}/none"],
        "vae-pipeline stage",
    ),
    # -- stages run out of order, registry and downstream jobs ---------------------------------
    Case(
        "evaluate-before-train",
        lambda ws, tmp: ["evaluate", "--set", f"outputs_dir={tmp}/out"],
        "vae-pipeline train",
    ),
    Case(
        "register-before-train",
        lambda ws, tmp: ["register", "--set", f"outputs_dir={tmp}/out"],
        "vae-pipeline train",
    ),
    Case(
        "embed-without-champion",
        lambda ws, tmp: ["embed", "--set", "register.name=nobody", "--out", f"{tmp}/e.parquet"],
        "nobody-encoder",
    ),
    Case(
        "embed-malformed-model-uri",
        lambda ws, tmp: ["embed", "--model", "models:/::bad", "--out", f"{tmp}/e.parquet"],
        "models:/::bad",
    ),
    Case(
        "embed-unknown-version",
        lambda ws, tmp: ["embed", "--model", "999", "--out", f"{tmp}/e.parquet"],
        "999",
    ),
    Case(
        "embed-array-of-another-shape",
        lambda ws, tmp: [
            "embed",
            "--source",
            _array(tmp, np.zeros((4, 28, 28), np.float32)),
            "--out",
            f"{tmp}/e.parquet",
        ],  # fmt: skip
        "28",
    ),
    Case(
        "embed-array-with-nan",
        lambda ws, tmp: [
            "embed",
            "--source",
            _array(tmp, _with(np.nan)),
            "--out",
            f"{tmp}/e.parquet",
        ],  # fmt: skip
        "NaN",
    ),
    Case(
        "embed-split-of-an-array",  # an array has no splits: it once embedded every row
        lambda ws, tmp: [
            "embed",
            "--source",
            _array(tmp, np.zeros((4, 8, 8), np.float32)),
            "--split",
            "test",
            "--out",
            f"{tmp}/e.parquet",
        ],  # fmt: skip
        "has no splits",
    ),
    Case(
        "embed-actor-larger-than-any-node",  # Ray would wait for such a node forever
        lambda ws, tmp: [
            "embed",
            "--set",
            "embed.cpus_per_actor=512",
            "--out",
            f"{tmp}/e.parquet",
        ],  # fmt: skip
        "fits no node",
    ),
    Case("generate-zero-images", lambda ws, tmp: ["generate", "-n", "0"], "-n"),
    # -- writes over what the pipeline did not create --------------------------------------------
    Case(
        "quickstart-out-over-a-foreign-folder",
        _foreign_model_folder,
        "is not a model vae-pipeline saved",
    ),
    Case(
        "stage-record-over-the-params-file",
        lambda ws, tmp: ["stage", "--record", str(ws.params_file)],
        "must end in .json",
    ),
    Case("stage-record-over-a-foreign-json", _foreign_record, "not written by vae-pipeline"),
    Case(
        "similar-without-embeddings",
        lambda ws, tmp: ["similar", "digits-00001", "--embeddings", f"{tmp}/none.parquet"],
        "vae-pipeline embed",
    ),
]


def test_the_table_covers_at_least_twenty_distinct_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_damages_nothing(case, workspace, tmp_path, capsys):
    files, registry = workspace.files(), workspace.registry()
    argv = case.args(workspace, tmp_path)
    if "--params" not in argv:
        argv += ["--params", str(workspace.params_file)]
    capsys.readouterr()

    code = main([*argv, "--quiet"])

    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err
    assert case.names in err, err
    assert workspace.files() == files, "a workspace file changed"
    assert workspace.registry() == registry, "the registry changed"
