"""What one retrain did, step by step: the flow fills it in as it goes, and it becomes a dict
only at the edges (the Markdown report, the flow's JSON result)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipelines.data.staging import StageResult
from pipelines.data.versioning.dvc import DataVersion
from pipelines.evaluation.evaluate import EvaluateResult
from pipelines.orchestration.retention import PruneResult
from pipelines.registry.register import RegisterResult
from pipelines.training.export import TrainResult


@dataclass(frozen=True)
class ChampionBefore:
    """The champion as it was before register moved any alias (for the report)."""

    version: str
    uri: str
    run_id: str | None
    data_dvc_md5: str | None
    metrics: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class DvcLockRecord:
    """Whether the flow left dvc.lock as `dvc repro` would, and where, or why not."""

    recorded: bool
    file: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"recorded": True, "file": self.file} if self.recorded else {
            "recorded": False, "reason": self.reason,
        }  # fmt: skip


@dataclass
class DataStep:
    """The data the run staged and how it was versioned and pushed."""

    staged: StageResult | None = None
    manifest_sha256: str | None = None
    version: DataVersion | None = None
    push_note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.staged is not None:
            staged = self.staged.to_dict()
            out.update(source=staged["source"], summary=staged["summary"])
        if self.manifest_sha256 is not None:
            out["manifest_sha256"] = self.manifest_sha256
        if self.version is not None:
            out.update(self.version.to_dict())
        if self.push_note is not None:
            out["push_note"] = self.push_note
        return out


@dataclass
class RetrainSummary:
    where: dict[str, str]  # what a user opens after the run (where_to_look)
    status: str = "running"  # running | completed | failed
    step: str | None = None  # the step running now (the failed one, when it fails)
    lock: str | None = None  # what guarded the run: the server's limit or the file lock
    waited_s: float | None = None
    data: DataStep = field(default_factory=DataStep)
    train: TrainResult | None = None
    evaluated: EvaluateResult | None = None
    champion_before: ChampionBefore | None = None
    register: RegisterResult | None = None
    embed: dict[str, Any] | None = None  # output, model_uri, n_samples; or skipped: why
    dvc_lock: DvcLockRecord | None = None
    retention: PruneResult | None = None
    retention_error: str | None = None
    flow_run: dict[str, Any] | None = None
    failed_step: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The dict the report renders and the flow's JSON result carries."""
        out: dict[str, Any] = {"status": self.status, "data": self.data.to_dict()}
        out["where"] = self.where
        scalars = {"step": self.step, "lock": self.lock, "waited_s": self.waited_s,
                   "embed": self.embed, "flow_run": self.flow_run,
                   "failed_step": self.failed_step, "error": self.error}  # fmt: skip
        out.update({k: v for k, v in scalars.items() if v is not None})
        parts = {"train": self.train, "register": self.register, "dvc_lock": self.dvc_lock,
                 "retention": self.retention}  # fmt: skip
        out.update({k: v.to_dict() for k, v in parts.items() if v is not None})
        if self.retention_error is not None:
            out["retention"] = {"error": self.retention_error}
        if self.evaluated is not None:
            out.update(metrics=self.evaluated.metrics, figures=self.evaluated.figures)
        if self.champion_before is not None or self.register is not None:
            cb = self.champion_before
            out["champion_before"] = None if cb is None else cb.to_dict()
        return out
