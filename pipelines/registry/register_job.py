"""What the register stage reads (RegisterJob, unpacked from params once at its edge) and what
it returns (RegisterResult)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import tracking
from pipelines.params import ClusterParams, Params, RegisterParams
from pipelines.paths import layout
from pipelines.registry import models as registry
from pipelines.registry.models import ModelRegistry


@dataclass
class RegisterResult:
    name: str
    # The alias the new pair got: champion | challenger; unchanged (registered before); or
    # not registered (a DVC experiment, register.in_experiments false).
    decision: str
    reason: str
    versions: dict[str, str]  # role -> version
    model_uris: dict[str, str]  # role -> models:/<name>-<role>/<version>
    previous_champion: str | None  # encoder version the gate compared against
    gate: dict[str, Any]
    mlflow_run_id: str
    record: str = ""
    champion: dict[str, str | None] = field(default_factory=dict)  # after registration

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "decision": self.decision,
            "reason": self.reason,
            "encoder_uri": self.model_uris.get("encoder"),
            "decoder_uri": self.model_uris.get("decoder"),
            "encoder_version": self.versions.get("encoder"),
            "decoder_version": self.versions.get("decoder"),
            "previous_champion": self.previous_champion,
            "champion": self.champion,
            "mean_diff": self.gate.get("mean_diff"),
            "ci": [self.gate.get("ci_low"), self.gate.get("ci_high")],
            "gate": self.gate,
            "mlflow_run_id": self.mlflow_run_id,
            "record": self.record,
        }


@dataclass(frozen=True)
class RegisterJob:
    """What registering reads, unpacked from params once (register_model's edge): the
    registry, the gate's settings, where the evaluation and the cluster are."""

    registry: ModelRegistry
    reg: RegisterParams
    cluster: ClusterParams
    eval_batch_size: int  # the gate scores in evaluate's batches
    shards_dir: Path
    train_dir: Path
    evaluate_dir: Path
    register_dir: Path
    experiment: str | None = None  # the DVC experiment this runs in (`dvc exp run`), if any

    @classmethod
    def from_params(cls, params: Params) -> RegisterJob:
        where = layout(params)
        return cls(
            registry=registry.registry_of(params), reg=params.registry, cluster=params.cluster,
            eval_batch_size=params.evaluate.batch_size, shards_dir=where.shards_dir,
            train_dir=where.train_dir, evaluate_dir=where.evaluate_dir,
            register_dir=where.register_dir, experiment=tracking.dvc_experiment(),
        )  # fmt: skip

    def model_name(self, role: str) -> str:
        return self.registry.model_name(role)


NOT_REGISTERED = "not registered"


def experiment_skip_reason(job: RegisterJob) -> str | None:
    """Why this registration registers nothing: it runs in a DVC experiment and
    register.in_experiments is false. None: register as usual (outside `dvc exp run`, or
    experiments register)."""
    name = job.experiment
    if name is None or job.reg.in_experiments:
        return None
    return (
        f"DVC experiment {name} with register.in_experiments false: nothing registered, no "
        f"alias moved; to register this model, `dvc exp apply {name}` then `dvc repro --force "
        "--single-item register` (or set register.in_experiments true)"
    )
