"""Every stage's job for one retrain, unpacked from params once at the flow's edge: the tasks
take these, never the whole params (each stage function takes its own sections)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines import tracking
from pipelines.data.staging import StageJob
from pipelines.evaluation.evaluate import EvaluateJob
from pipelines.jobs.embed import EmbedJob
from pipelines.orchestration.retention import RetentionJob
from pipelines.params import Params
from pipelines.paths import Layout
from pipelines.registry.models import ModelRegistry
from pipelines.registry.register import RegisterJob
from pipelines.training.job import TrainJob


@dataclass(frozen=True)
class RetrainJobs:
    stage: StageJob
    train: TrainJob
    evaluate: EvaluateJob
    register: RegisterJob
    prune: RetentionJob
    embed: EmbedJob
    embed_on_promotion: bool

    @classmethod
    def from_params(cls, params: Params) -> RetrainJobs:
        return cls(
            stage=StageJob.from_params(params), train=TrainJob.from_params(params),
            evaluate=EvaluateJob.from_params(params), register=RegisterJob.from_params(params),
            prune=RetentionJob.from_params(params), embed=EmbedJob.from_params(params),
            embed_on_promotion=params.embed.on_promotion,
        )  # fmt: skip

    # One source for each: the jobs that use them already hold them.
    @property
    def registry(self) -> ModelRegistry:
        return self.register.registry

    @property
    def root(self) -> Path:
        return self.train.root

    @property
    def where(self) -> Layout:
        return self.train.where

    @property
    def store(self) -> tracking.Store:
        return self.registry.store
