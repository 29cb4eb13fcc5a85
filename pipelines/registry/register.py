"""The `register` stage: the trained encoder and decoder become registered model versions, and
the promotion gate decides which alias the pair gets.

Order, so that a failure anywhere leaves the aliases as they were:
1. log both models into the training run (the slow part, outside the lock);
2. under an exclusive lock: evaluate against the current champion, re-read the champion
   (compare-and-set), create both versions with all their tags (pair, run, data version, git
   commit, test metrics, the gate's decision and numbers), then move the two aliases together.
If anything fails, a half-moved alias is put back and the new versions are deleted.

The lock is a file lock: beside the SQLite file for the embedded store, in the temp folder for
a tracking server. A server has no lock of its own, so registrations from several machines
are only guarded by the compare-and-set re-read, which leaves a window of one alias write.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipelines import atomic, guards, tracking, tracking_checks
from pipelines.data.versioning.lineage import require_trained_on
from pipelines.errors import PipelineError
from pipelines.registry import gate
from pipelines.registry import models as registry
from pipelines.registry.export import descriptions, encoder_layout, log_models
from pipelines.registry.models import CHAMPION, ROLES, alias_version
from pipelines.registry.register_job import (
    NOT_REGISTERED,
    RegisterJob,
    RegisterResult,
    experiment_skip_reason,
)
from pipelines.scoring import shard_scoring
from pipelines.scoring.held_out_pass import Summary
from pipelines.scoring.shard_scoring import ScoringJob
from vae import Autoencoder, load_model

_CAS_ATTEMPTS = 3
_TEST_KEYS = ("neg_elbo", "recon_nll", "kl", "iw_nll", "iw_k", "active_units", "n_examples")


# -- inputs ------------------------------------------------------------------------------------


def _read_json(path: Path, missing: str) -> dict:
    if not path.is_file():
        raise PipelineError(f"{path} not found; {missing}")
    return json.loads(path.read_text())


def _inputs(job: RegisterJob) -> tuple[dict, dict, Path]:
    info = _read_json(
        job.train_dir / "train_result.json", "run 'vae-pipeline train' first"
    )  # fmt: skip
    metrics = _read_json(
        job.evaluate_dir / "metrics.json", "run 'vae-pipeline evaluate' first"
    )  # fmt: skip
    return info, metrics, job.train_dir / "model"


@dataclass
class _TestSplit:
    """The gate's test split: how every model compared is scored on it (one job: the same
    per-example seeds, register.seed, and the same register.mc_samples samples for each, so
    the paired differences cancel the Monte-Carlo noise), the new model's per-example -ELBO in
    shard order, and the logged models' input example."""

    job: ScoringJob
    scores: np.ndarray
    example: torch.Tensor


def _gate_job(job: RegisterJob) -> ScoringJob:
    from pipelines.data.shards.manifest import read_manifest

    shards_dir = job.shards_dir
    rp = job.reg
    return ScoringJob(
        shards_dir=str(shards_dir), manifest=read_manifest(shards_dir), split="test",
        batch_size=job.eval_batch_size, seed=rp.seed, mc_samples=rp.mc_samples,
        per_example=True,
    )  # fmt: skip


def _test_scores(rj: RegisterJob, model: Autoencoder, scoring: ScoringJob, desc: str):
    """A model's per-example -ELBOs on the test split, scored on the cluster as evaluate is."""
    parts = shard_scoring.on_cluster(rj.cluster, model, scoring, desc, progress=False)
    return shard_scoring.per_example_neg_elbo(parts), parts


def _score_test_split(rj: RegisterJob, model: Autoencoder) -> _TestSplit:
    """The new model's scores, from one pass that also checks every test shard (SHA-256)
    before anything is logged or registered."""
    scoring = _gate_job(rj)
    if not scoring.manifest.splits.test.shards:
        raise PipelineError("the test split is empty; re-stage with data.test_fraction > 0")
    scores, parts = _test_scores(rj, model, scoring, "scoring the new model")
    first = Summary([p.noted for p in parts]).first
    return _TestSplit(scoring, scores, first)


def _champion_scores(job: RegisterJob, champion: Autoencoder, test: _TestSplit) -> np.ndarray:
    """The champion scored with the new model's job: the same z samples for every example."""
    return _test_scores(job, champion, test.job, "scoring the champion")[0]


def _version_tags(info: dict, metrics: dict, model: Autoencoder, run, weights_sha256: str) -> dict:
    data = info.get("data_version") or {}
    tags = {
        "mlflow_run_id": run.info.run_id,
        "vae.run_name": str(info.get("run_name")),
        "data.manifest_sha256": str(data.get("manifest_sha256")),
        "data.dvc_md5": str(data.get("dvc_md5")),
        "git_commit": run.data.tags.get("git_commit", "unknown"),
        "likelihood": model.config.likelihood,
        "vae.kind": model.config.kind,
        "vae.latent_dim": str(model.config.latent_dim),
        "vae.input_shape": json.dumps(list(model.config.input_shape)),
        "vae.encoder_output": encoder_layout(model),
        "weights_sha256": weights_sha256,
        "vae.export_format": str(registry.EXPORT_FORMAT),
    }
    tags.update({f"test.{k}": str(metrics[k]) for k in _TEST_KEYS if metrics.get(k) is not None})
    return tags


# -- registry writes ---------------------------------------------------------------------------


def _create_versions(
    client, job: RegisterJob, logged: dict, run_id: str, tags: dict, desc: dict, versions: dict
) -> None:
    """Both versions, each tagged with the other, recorded in versions as they are created
    (so that a failure half-way can delete the first)."""
    from mlflow.exceptions import MlflowException

    for role in ROLES:
        name = job.model_name(role)
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        uri, model_id = logged[role]
        mv = client.create_model_version(
            name, source=uri, run_id=run_id, tags={**tags, "vae.role": role},
            description=desc[role], model_id=model_id,
        )  # fmt: skip
        versions[role] = str(mv.version)
    for role, other in zip(ROLES, reversed(ROLES), strict=True):
        pair = f"models:/{job.model_name(other)}/{versions[other]}"
        client.set_model_version_tag(job.model_name(role), versions[role], "vae.pair", pair)


def _move_aliases(client, job: RegisterJob, versions: dict[str, str], alias: str) -> None:
    """Point alias at the new pair, both or neither: a failed second move undoes the first."""
    names = {role: job.model_name(role) for role in ROLES}
    before = {role: alias_version(client, names[role], alias) for role in ROLES}
    moved: list[str] = []
    try:
        for role in ROLES:
            client.set_registered_model_alias(names[role], alias, versions[role])
            moved.append(role)
    except BaseException:
        for role in moved:
            if before[role] is None:
                client.delete_registered_model_alias(names[role], alias)
            else:
                client.set_registered_model_alias(names[role], alias, before[role])
        raise


def _discard(client, job: RegisterJob, versions: dict[str, str]) -> None:
    """Best effort: a failed registration leaves no half pair behind in the registry."""
    for role, version in versions.items():
        try:
            client.delete_model_version(job.model_name(role), version)
        except Exception:  # noqa: BLE001 - the original error matters more
            pass


def registration_lock(job: RegisterJob):
    """An exclusive lock per tracking store and model name (released if the process dies)."""
    from filelock import FileLock

    uri = job.registry.store.uri
    if uri.startswith("sqlite:///"):
        path = Path(f"{uri.removeprefix('sqlite:///')}.register-{job.registry.name}.lock")
    else:
        digest = hashlib.sha256(f"{uri}\n{job.registry.name}".encode()).hexdigest()[:16]
        path = Path(tempfile.gettempdir()) / "vae-pipeline-locks" / f"register-{digest}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path), timeout=job.reg.lock_timeout_s)


# -- the gate ----------------------------------------------------------------------------------


def _gate_once(job: RegisterJob, client, model: Autoencoder, test: _TestSplit) -> gate.GateResult:
    rp = job.reg
    champion = alias_version(client, job.model_name("encoder"), CHAMPION)
    if champion is None:
        return gate.first_model(rp)
    try:  # the champion as MLflow hands it over (its pt2 programs), scored as the new model is
        old, old_version = registry.load_pair(job.registry, champion)
    except registry.OlderExport as exc:  # not an error: it stays champion until promoted by hand
        return gate.not_comparable(str(exc).split(";")[0], champion, rp)
    why = gate.incomparable(model, old) or _other_split(job, old_version.tags)
    if why is not None:
        return gate.not_comparable(why, champion, rp)
    old_scores = _champion_scores(job, old, test)
    return gate.compare(test.scores, old_scores, champion, rp)


def split_tag(shards_dir: Path) -> str:
    """The staged shards' split, as recorded on every version registered from them."""
    from pipelines.data.shards.manifest import read_manifest

    split = read_manifest(shards_dir).split
    tag = f"val_fraction={split.val_fraction},test_fraction={split.test_fraction}"
    return tag + (",rule=official" if split.rule == "official" else "")


def _other_split(job: RegisterJob, champion_tags: dict[str, str]) -> str | None:
    """A champion trained under another split may have trained on today's test examples,
    which would score it unfairly well: not comparable."""
    theirs, ours = champion_tags.get("data.split"), split_tag(job.shards_dir)
    if theirs is not None and theirs != ours:
        return f"the champion was trained with split {theirs}, the test split now is {ours}"
    return None


def _decide(job: RegisterJob, client, model: Autoencoder, test: _TestSplit) -> gate.GateResult:
    """Gate against the champion, and check it is still the champion afterwards."""
    for _ in range(_CAS_ATTEMPTS):
        result = _gate_once(job, client, model, test)
        now = alias_version(client, job.model_name("encoder"), CHAMPION)
        if now == result.champion_version:
            return result
    raise PipelineError(
        f"the champion kept changing while this registration evaluated ({_CAS_ATTEMPTS} tries): "
        "another machine is registering at the same time; re-run 'vae-pipeline register'"
    )


# -- the stage ---------------------------------------------------------------------------------


def register_model(job: RegisterJob, progress: bool = True) -> RegisterResult:
    """Register the trained pair, gate it against the champion, move aliases all-or-nothing."""
    if (why := experiment_skip_reason(job)) is not None:
        return _not_registered(job, why)
    info, metrics, model_dir, model, test = _checked_inputs(job)
    client, run = _training_run_of(job, info)
    run_id = run.info.run_id
    digest = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    existing = _already_registered(job, client, run_id, digest)
    if existing is not None:
        return existing
    bar = tqdm(total=4, desc="register", unit="step", disable=not progress)
    try:
        bar.set_postfix_str("logging encoder and decoder")
        logged = log_models(model, run_id, model_dir, test.example)
        _link_test_metrics(job, client, run_id, logged, info, metrics)
        bar.update()
        tags = _version_tags(info, metrics, model, run, digest)
        tags["data.split"] = split_tag(job.shards_dir)
        decision, versions = _register_pair(job, client, model, test, logged, tags, bar)
    finally:
        bar.close()
    result = RegisterResult(
        name=job.registry.name,
        decision=decision.decision,
        reason=decision.reason,
        versions=versions,
        model_uris={r: f"models:/{job.model_name(r)}/{versions[r]}" for r in ROLES},
        previous_champion=decision.champion_version,
        gate=decision.to_dict(),
        mlflow_run_id=run_id,
        champion={r: alias_version(client, job.model_name(r), CHAMPION) for r in ROLES},
    )
    result.record = str(_write_record(job, result))
    return result


def _not_registered(job: RegisterJob, why: str) -> RegisterResult:
    """A DVC experiment's register stage when experiments do not register: its record (the
    stage's DVC out) says so and how to register the model, and the registry is not touched."""
    info, _, _ = _inputs(job)
    guards.check_writable(job.register_dir, "outputs_dir")
    result = RegisterResult(
        name=job.registry.name, decision=NOT_REGISTERED, reason=why, versions={},
        model_uris={}, previous_champion=None, gate={},
        mlflow_run_id=str(info.get("mlflow_run_id")),
    )  # fmt: skip
    result.record = str(_write_record(job, result))
    return result


def _already_registered(job: RegisterJob, client, run_id: str, digest: str):
    """The result of an earlier registration of these very weights from this training run, in
    today's export format, if there was one: registering them again would add an identical
    challenger (every `dvc repro` of an unchanged pipeline did), so it is a no-op that says so.
    An older format's version is registered again: that is how the jobs can load it."""
    found = {}
    same_as = {"mlflow_run_id": run_id, "weights_sha256": digest,
               "vae.export_format": str(registry.EXPORT_FORMAT)}  # fmt: skip
    for role in ROLES:
        name = job.model_name(role)
        same = [
            v for v in client.search_model_versions(f"name='{name}'")
            if all((v.tags or {}).get(k) == want for k, want in same_as.items())
        ]  # fmt: skip
        if not same:
            return None
        found[role] = max(same, key=lambda v: int(v.version))
    versions = {r: str(v.version) for r, v in found.items()}
    earlier = (found["encoder"].tags or {}).get("gate.decision", "registered")
    champion = {r: alias_version(client, job.model_name(r), CHAMPION) for r in ROLES}
    result = RegisterResult(
        name=job.registry.name,
        decision="unchanged",
        reason=f"these weights of training run {run_id} are already registered as version "
        f"{versions['encoder']} (then: {earlier}); nothing registered, no alias moved",
        versions=versions,
        model_uris={r: f"models:/{job.model_name(r)}/{versions[r]}" for r in ROLES},
        previous_champion=champion["encoder"],
        gate={},
        mlflow_run_id=run_id,
        champion=champion,
    )
    result.record = str(_write_record(job, result))
    return result


def _checked_inputs(job: RegisterJob) -> tuple[dict, dict, Path, Autoencoder, _TestSplit]:
    """What registration reads, checked before anything is logged or registered."""
    info, metrics, model_dir = _inputs(job)
    # Its record is written after the aliases move: a folder that cannot take it must fail now.
    guards.check_writable(job.register_dir, "outputs_dir")
    model = load_model(model_dir)
    split_tag(job.shards_dir)  # reads the manifest: a damaged one is named as such
    require_trained_on(
        job.shards_dir,
        info.get("data_version"),
        f"the model in {model_dir}",
    )
    return info, metrics, model_dir, model, _score_test_split(job, model)


def _link_test_metrics(
    job: RegisterJob, client, run_id: str, logged: dict, info: dict, metrics: dict
) -> None:
    """The evaluation's test metrics on both logged models, linked to the test split's dataset
    (the one train logged as the run's test input), so MLflow's model pages compare them."""
    from pipelines.data.shards.manifest import read_manifest

    test = tracking.data_ref(read_manifest(job.shards_dir), info.get("data_version") or {}, "test")
    model_ids = [model_id for _, model_id in logged.values()]
    tracking.log_model_metrics(
        client, run_id, model_ids, tracking.evaluation_metrics(metrics), test
    )


def _training_run_of(job: RegisterJob, info: dict):
    """An MLflow client on the store train logged to, and the training run there."""
    import mlflow

    tracking_checks.check_reachable(job.registry.store)
    mlflow.set_tracking_uri(job.registry.store.uri)
    client = tracking.client(job.registry.store)
    run = tracking.training_run(job.registry.store, client, info)
    # Logged models go to the active experiment, not the run's, unless told (MLflow 3.17).
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    return client, run


def _register_pair(job: RegisterJob, client, model, test, logged, tags, bar):
    """Under the lock: gate, create both versions (the decision among their tags), move the
    alias. Any failure deletes what was created and leaves the aliases as they were."""
    from filelock import Timeout

    versions: dict[str, str] = {}
    try:
        bar.set_postfix_str("waiting for the registration lock")
        with registration_lock(job):
            bar.set_postfix_str("gate: paired test -ELBO against the champion")
            decision = _decide(job, client, model, test)
            bar.update()
            bar.set_postfix_str("creating versions")
            all_tags = {**tags, **decision.tags()}
            run_id = tags["mlflow_run_id"]  # the training run the models were logged into
            _create_versions(client, job, logged, run_id, all_tags, descriptions(model), versions)
            bar.update()
            bar.set_postfix_str(f"moving alias {decision.decision}")
            _move_aliases(client, job, versions, decision.decision)
            bar.update()
    except Timeout as exc:
        _discard(client, job, versions)
        raise PipelineError(
            f"another registration held {exc.lock_file} for over "
            f"{job.reg.lock_timeout_s:g} s; re-run when it is done "
            "(or raise register.lock_timeout_s)"
        ) from exc
    except BaseException:
        _discard(client, job, versions)
        raise
    return decision, versions


def _write_record(job: RegisterJob, result: RegisterResult) -> Path:
    """outputs/register/register.json: what DVC tracks for this stage."""
    out = job.register_dir
    out.mkdir(parents=True, exist_ok=True)
    path = out / "register.json"
    record = result.to_dict()
    record.pop("record")
    atomic.atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path
