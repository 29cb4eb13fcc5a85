"""What the train stage reads, unpacked from params once (its edge): the sections it trains
with, where it writes, the tracking store, and every parameter as MLflow will record it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pipelines import tracking
from pipelines.params import ClusterParams, DataParams, ModelParams, Params, TrainParams
from pipelines.paths import Layout, layout


@dataclass(frozen=True)
class TrainJob:
    root: Path
    where: Layout
    store: tracking.Store
    model: ModelParams
    train: TrainParams
    data: DataParams
    cluster: ClusterParams
    register_name: str  # whose model the outputs folder holds (a second dataset is refused)
    logged_params: dict[str, str]  # the whole params file, flat, for the MLflow run
    # Set by a sweep for each of its trials: more MLflow tags (the parent run, the trial's
    # overrides), and the workers' reports forwarded to Ray Tune.
    extra_tags: tuple[tuple[str, str], ...] = ()
    report_to_tune: bool = False

    @classmethod
    def from_params(cls, params: Params) -> TrainJob:
        return cls(
            root=params.root, where=layout(params), store=tracking.store_of(params),
            model=params.model, train=params.train, data=params.data, cluster=params.cluster,
            register_name=params.registry.name, logged_params=tracking.flat_params(params),
        )  # fmt: skip

    @property
    def batch_parts(self) -> int:
        return self.train.parts_on(self.cluster)

    def run_name(self, data_hash: str) -> str:
        """cluster.run_name, else one derived from the params and the data."""
        return self.cluster.run_name or default_run_name(
            self.model, self.train, self.cluster, data_hash
        )


def default_run_name(
    model: ModelParams, train: TrainParams, cluster: ClusterParams, data_hash: str
) -> str:
    """Same params + same data => same name => a re-run resumes instead of starting over.

    The name leaves out what does not change the model: where Ray runs (a run may resume on
    another cluster), a worker's CPUs, restarts allowed, and, once train.batch_parts fixes the
    arithmetic, the worker count. So a run given more workers resumes from its checkpoint, or
    is reused when finished, instead of training the same model again."""
    ignored = {"address", "cpus_per_worker", "max_failures"}
    if train.batch_parts is not None:
        ignored.add("num_workers")
    relevant = {
        "model": model.model_dump(mode="json"),
        "train": train.model_dump(mode="json"),
        "cluster": cluster.model_dump(mode="json", exclude=ignored),
    }
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()
    return f"vae-{data_hash[:8]}-{digest[:8]}"
