"""Where each stage writes: every output location in one place, so stages never import each
other to find their inputs. All paths resolve against the params' root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.params import Params
from pipelines.storage import location, resolve_in

STAGE_RECORD = "data/stage.json"  # the --record path of the stage command in dvc.yaml


@dataclass(frozen=True)
class Layout:
    """The settings that place outputs (outputs_dir, data.shards_dir, embed.output) and the
    folder they resolve in."""

    root: Path
    outputs_dir: str
    shards_setting: str
    embed_output: str | None = None

    def _resolve(self, path: str) -> Path:
        return resolve_in(self.root, path)

    @property
    def stage_record(self) -> Path:
        """The stage's machine-independent summary that dvc.yaml's later stages depend on."""
        return self._resolve(STAGE_RECORD)

    @property
    def shards_dir(self) -> Path:
        """The staged shards every stage reads (data.shards_dir): a local folder, or a UPath
        for an object-store URL (s3://bucket/prefix)."""
        return location(self.shards_setting, self.root)

    @property
    def train_dir(self) -> Path:
        return self._resolve(self.outputs_dir) / "train"

    @property
    def evaluate_dir(self) -> Path:
        return self._resolve(self.outputs_dir) / "evaluate"

    @property
    def register_dir(self) -> Path:
        return self._resolve(self.outputs_dir) / "register"

    def embeddings_path(self, output: str | None = None) -> Path:
        """Where embed writes (and similar reads): output, embed.output, or the outputs folder."""
        chosen = output or self.embed_output
        return location(chosen or f"{self.outputs_dir}/embed/embeddings.parquet", self.root)

    def samples_path(self, out: str | None = None) -> Path:
        """Where generate writes its grid: out, or the outputs folder."""
        return self._resolve(out or f"{self.outputs_dir}/generate/samples.png")


def layout(params: Params) -> Layout:
    return Layout(params.root, params.outputs_dir, params.data.shards_dir, params.embed.output)
