"""The `evaluate` stage: the best trained model on the test split.

Writes `metrics.json`, `scores.json` (DVC metrics: the headline numbers), PNG figures, and logs both to the training run in MLflow.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipelines import atomic, guards, tracking, tracking_checks
from pipelines.data.shards.manifest import Manifest, read_manifest
from pipelines.data.shards.reader import verify_shards
from pipelines.data.versioning.lineage import require_trained_on
from pipelines.errors import PipelineError
from pipelines.evaluation import figures
from pipelines.params import ClusterParams, EvaluateParams, Params
from pipelines.paths import Layout, layout
from pipelines.scoring import shard_scoring
from pipelines.scoring.held_out_pass import Summary
from pipelines.scoring.shard_scoring import ScoringJob
from vae import DataError, load_model, mutual_information_gap

log = logging.getLogger(__name__)


@dataclass
class EvaluateResult:
    metrics: dict[str, Any]
    metrics_file: str
    figures: dict[str, str] = field(default_factory=dict)
    mlflow_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "metrics_file": self.metrics_file,
            "figures": self.figures,
            "mlflow_run_id": self.mlflow_run_id,
        }


def _trained(tdir: Path) -> tuple[dict, Path]:
    info = tdir / "train_result.json"
    if not info.is_file():
        raise PipelineError(f"no trained model in {tdir}; run 'vae-pipeline train' first")
    return json.loads(info.read_text()), tdir


# What `dvc metrics show/diff` compares across runs (dvc.yaml): the test figures, nats per
# example, and counts; metrics.json keeps everything, with lists and names.
SCORES = ("neg_elbo", "recon_nll", "kl", "iw_nll", "iw_nll_se", "active_units", "mig")


def _scoring_job(ep: EvaluateParams, manifest: Manifest, shards_dir, factors: bool) -> ScoringJob:
    n_test = manifest.splits.test.samples
    fraction = None if ep.iw_examples is None else min(1.0, ep.iw_examples / max(1, n_test))
    return ScoringJob(
        shards_dir=str(shards_dir), manifest=manifest, batch_size=ep.batch_size, split="test",
        seed=ep.seed, iw_k=ep.iw_k, iw_fraction=fraction, all_means=factors, factors=factors,
    )  # fmt: skip


@dataclass(frozen=True)
class EvaluateJob:
    """What evaluate reads, unpacked from params once: its section, the cluster that scores,
    where the model, shards and figures are, and the tracking store."""

    evaluate: EvaluateParams
    cluster: ClusterParams
    where: Layout
    store: tracking.Store

    @classmethod
    def from_params(cls, params: Params) -> EvaluateJob:
        return cls(params.evaluate, params.cluster, layout(params), tracking.store_of(params))


def evaluate_model(job: EvaluateJob, progress: bool = True) -> EvaluateResult:
    info, tdir = _trained(job.where.train_dir)
    model = load_model(tdir / "model")
    shards_dir = job.where.shards_dir
    manifest = read_manifest(shards_dir)  # a damaged one is named as such, not as a version
    require_trained_on(shards_dir, info.get("data_version"), f"the model in {tdir / 'model'}")
    verify_shards(shards_dir, ("test",))
    run_id = info.get("mlflow_run_id")
    if run_id:
        tracking_checks.check_reachable(job.store)  # before the work, not after it
        tracking.training_run(job.store, tracking.client(job.store), info)
    out = job.where.evaluate_dir
    guards.check_writable(out, "outputs_dir")  # a read-only folder fails now, not at the end
    if not manifest.splits.test.shards:
        raise PipelineError("the test split is empty; re-stage with data.test_fraction > 0")
    # Sprites record their generative factors: the shards' passes carry them along for MIG.
    factors = bool(manifest.factors)
    scoring = _scoring_job(job.evaluate, manifest, shards_dir, factors)
    parts = shard_scoring.on_cluster(job.cluster, model, scoring, "evaluate", progress)
    sums, noted = shard_scoring.merge(parts, model.config.latent_dim)
    res = sums.result(model.config, job.evaluate.iw_k)
    res.decoder = model.likelihood.describe()
    held_out = Summary(noted)
    metrics = res.to_dict() | _mig_metrics(held_out, manifest)
    metrics_file = out / "metrics.json"
    try:  # every file atomic: a failed write leaves the old file or none, never a temp file
        atomic.atomic_write_text(metrics_file, json.dumps(metrics, indent=2))  # register reads it
        scores = {k: metrics[k] for k in SCORES if isinstance(metrics.get(k), (int, float))}
        atomic.atomic_write_text(out / "scores.json", json.dumps(scores, indent=2))
        classes = manifest.classes
        figs = _figures(model, held_out, out, tdir, res.likelihood, job.evaluate.seed, classes)
    except OSError as exc:
        target = Path(str(exc.filename2 or exc.filename or out))
        name = "" if target.name.startswith(".") else f" at {target.name}"  # not a temp file
        raise PipelineError(
            f"outputs_dir: writing the evaluation to {out} failed{name} ({exc.strerror or exc}); "
            "make room or fix that folder, and re-run 'vae-pipeline evaluate'"
        ) from exc
    if run_id:
        _log_to_mlflow(job.store, run_id, metrics_file, metrics, figs)
    return EvaluateResult(metrics, str(metrics_file), {k: str(v) for k, v in figs.items()}, run_id)


def _mig_metrics(held_out: Summary, manifest: Manifest) -> dict[str, Any]:
    """`mig` and `mig_per_factor` of the test posterior means where the source records its
    generative factors (sprites); nothing, and no extra work, for the other sources."""
    spec = manifest.factors
    if not spec:
        return {}
    try:
        res = mutual_information_gap(held_out.all_posterior_means(), held_out.all_factors())
    except DataError as exc:  # a tiny test split or a 1-d code: the other metrics still stand
        log.warning("MIG left out of the metrics: %s", exc)
        return {}
    names = spec["names"]
    if res.skipped:
        log.info(
            "MIG skips factors constant on the test split: %s", [names[k] for k in res.skipped]
        )
    gaps = {names[k]: float(g) for k, g in enumerate(res.gaps) if k not in res.skipped}
    return {"mig": res.mig, "mig_per_factor": gaps}


def _figures(
    model,
    held_out: Summary,
    out: Path,
    tdir: Path,
    likelihood: str,
    seed: int,
    classes: list[str] | None = None,
) -> dict[str, Path]:
    first = held_out.first
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.eval()
        with torch.no_grad():
            recon = model(first).recon_x.numpy()
        samples = model.sample(64).numpy()
    mus, labels = held_out.latent()
    figs = {
        "reconstructions": figures.reconstructions(
            first.numpy(), recon, out / "reconstructions.png"
        ),
        "samples": figures.image_grid(
            samples, out / "samples.png", f"samples from the prior ({likelihood} decoder means)"
        ),
        "latent": figures.latent_projection(mus, labels, out / "latent.png", classes),
    }
    history_file = tdir / "history.json"
    if history_file.is_file():
        history = json.loads(history_file.read_text())
        figs["learning_curves"] = figures.learning_curves(
            history, out / "learning_curves.png", likelihood
        )
    return figs


def _log_to_mlflow(
    store: tracking.Store, run_id: str, metrics_file: Path, metrics: dict, figs: dict[str, Path]
) -> None:
    from mlflow.entities import Metric

    tracking_checks.check_reachable(store)
    client = tracking.client(store)
    # register logs the same numbers again on the logged models, linked to the test split.
    scalars = tracking.evaluation_metrics(metrics)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in sorted(scalars.items())])
    client.set_tag(run_id, "eval.likelihood", metrics["likelihood"])
    client.set_tag(run_id, "eval.objective", metrics["objective"])
    client.set_tag(run_id, "eval.decoder", metrics["decoder"])
    for path in figs.values():
        client.log_artifact(run_id, str(path), artifact_path="figures")
    client.log_artifact(run_id, str(metrics_file))
