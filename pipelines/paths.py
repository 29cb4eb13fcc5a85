"""Where each stage writes: every output location in one place, so stages never import each
other to find their inputs. All paths resolve against the params' root."""

from __future__ import annotations

from pathlib import Path

from pipelines.params import Params
from pipelines.storage import location

STAGE_RECORD = "data/stage.json"  # the --record path of the stage command in dvc.yaml


def stage_record(params: Params) -> Path:
    """The stage's machine-independent summary that dvc.yaml's later stages depend on."""
    return params.resolve(STAGE_RECORD)


def shards_dir(params: Params) -> Path:
    """The staged shards every stage reads (data.shards_dir): a local folder, or a UPath for
    an object-store URL (s3://bucket/prefix)."""
    from pipelines.storage import location

    return location(params.data.shards_dir, params.root)


def train_dir(params: Params) -> Path:
    return params.resolve(params.outputs_dir) / "train"


def evaluate_dir(params: Params) -> Path:
    return params.resolve(params.outputs_dir) / "evaluate"


def register_dir(params: Params) -> Path:
    return params.resolve(params.outputs_dir) / "register"


def embeddings_path(params: Params, output: str | None = None) -> Path:
    """Where embed writes (and similar reads): output, embed.output, or the outputs folder."""
    chosen = output or params.embed.output
    return location(chosen or f"{params.outputs_dir}/embed/embeddings.parquet", params.root)


def samples_path(params: Params, out: str | None = None) -> Path:
    """Where generate writes its grid: out, or the outputs folder."""
    return params.resolve(out or f"{params.outputs_dir}/generate/samples.png")
