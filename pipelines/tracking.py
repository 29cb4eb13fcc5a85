"""MLflow tracking: where runs go, and one MLflow run per training run name (resumable).

Nothing here runs at import time: the tracking URI is resolved when a stage asks for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.atomic import atomic_write_text
from pipelines.errors import PipelineError
from pipelines.params import MlflowParams, Params
from pipelines.storage import is_remote

if TYPE_CHECKING:
    from pipelines.data.shards.manifest import Manifest

log = logging.getLogger("vae_pipeline.tracking")
# Names of environment variables whose values must never reach MLflow params, tags or logs.
_SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIAL|AUTH)", re.IGNORECASE)
# user:password@ in a URI (a tracking server, a Ray address): logged without it.
_URI_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


@dataclass(frozen=True)
class Store:
    """The MLflow tracking store a command uses, resolved once from the mlflow section: what
    every tracking function takes instead of the whole params."""

    uri: str  # SQLite paths absolute: Ray workers change directory
    experiment: str
    named_by: str  # where the URI came from, for messages
    default_db: Path | None = None  # the embedded default's mlflow.db; None when one was named

    @property
    def artifact_location(self) -> str | None:
        """Local artifact root beside the SQLite file (a tracking server manages its own)."""
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        return None


def store(mlflow: MlflowParams, root: Path) -> Store:
    """mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else SQLite beside params.yaml (root).

    SQLite paths are made absolute (a relative one in params.yaml is read from params.yaml's
    folder, like every other path there) because Ray workers change directory.
    """
    if mlflow.tracking_uri:
        uri = _absolute_sqlite(mlflow.tracking_uri, root)
        return Store(uri, mlflow.experiment, "mlflow.tracking_uri")
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return Store(_absolute_sqlite(uri, Path.cwd()), mlflow.experiment, "$MLFLOW_TRACKING_URI")
    db = (dvc_workspace(root) / "mlflow.db").resolve()
    return Store(f"sqlite:///{db}", mlflow.experiment, "tracking URI (default)", db)


def dvc_workspace(root: Path) -> Path:
    """The workspace a user works in: root, except in the temporary copy of the repository
    that `dvc exp run --queue` (or --temp) runs an experiment in, <repo>/.dvc/tmp/exps/<tmp>,
    which DVC deletes afterwards. There it is the repository the experiment was queued from
    (DVC sets DVC_ROOT to it), so a queued experiment's MLflow run lands in the same embedded
    store as a plain `dvc exp run`'s."""
    queued_from = os.environ.get("DVC_ROOT")
    if queued_from:
        main = Path(queued_from).resolve()
        if root.resolve().is_relative_to(main / ".dvc" / "tmp" / "exps"):
            return main
    return root


def dvc_experiment() -> str | None:
    """The DVC experiment's name under `dvc exp run` (DVC sets DVC_EXP_NAME for each stage
    command, queued or not); None outside one."""
    return os.environ.get("DVC_EXP_NAME") or None


def store_of(params: Params) -> Store:
    """The store of a params file (for the edges that hold one)."""
    return store(params.mlflow, params.root)


def _absolute_sqlite(uri: str, base: Path) -> str:
    if not uri.startswith("sqlite:///"):
        return uri
    path, sep, query = uri.removeprefix("sqlite:///").partition("?")
    if not path or path == ":memory:" or path.startswith(("/", "file:")):
        return uri
    return f"sqlite:///{Path(os.path.abspath(base / path))}{sep}{query}"


def client(s: Store):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=s.uri)


def masked(uri: str) -> str:
    """uri without the user:password@ part, for messages and logs."""
    return _URI_USERINFO.sub("***@", uri)


# -- a moved or copied repo: the embedded store cannot follow it --------------------------------
# MLflow records absolute artifact paths in the store, and its public API cannot change them, so
# a copied repo's mlflow.db would read and write the original folder's artifacts. Refused in one
# line instead (never rewritten: MLflow's tables are MLflow's).


def experiment_id(s: Store) -> str:
    c = client(s)
    exp = c.get_experiment_by_name(s.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(s.experiment, artifact_location=s.artifact_location)
    except Exception:  # created concurrently by another process: use theirs
        exp = c.get_experiment_by_name(s.experiment)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit(root: Path) -> str:
    """HEAD commit of the repo holding params.yaml, with '-dirty' if it has local changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def flat_params(params: Params) -> dict[str, str]:
    """Every parameter as `section.key` -> string, for mlflow params."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = _URI_USERINFO.sub("***@", str(node))

    walk("", params.model_dump(mode="json"))
    return {k: v for k, v in out.items() if not _SECRET_NAME.search(k)}


def start_or_resume_run(
    s: Store, logged: dict[str, str], run_name: str, run_dir: Path, tags: dict[str, str]
) -> str:
    """The MLflow run for this training run: the one recorded in run_dir, or a new one that
    logs `logged` (flat_params of the run's params) as its params.

    The run id is kept in a file beside the checkpoints rather than found by searching run
    names, so a resumed training continues exactly its own MLflow run.
    """
    id_file = run_dir / "mlflow_run_id"
    c = client(s)
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        try:
            c.get_run(run_id)
            c.update_run(run_id, status="RUNNING")
            return run_id
        except Exception:
            pass  # the tracking store was reset: start a new run below
    run = c.create_run(experiment_id(s), run_name=run_name, tags=tags)
    run_id = run.info.run_id
    items = sorted(logged.items())
    from mlflow.entities import Param

    try:
        c.log_batch(run_id, params=[Param(k, v) for k, v in items])  # the client chunks it
        atomic_write_text(id_file, run_id)
    except BaseException:
        # Not left RUNNING: a later run of the same name starts a new one (no id was kept).
        with contextlib.suppress(Exception):
            c.set_terminated(run_id, status="FAILED")
        raise
    return run_id


# -- lineage: the data a run used and the scores its models got, in MLflow's own records ------

# MLflow's input contexts for the three splits (its UI labels a run's datasets with them).
CONTEXTS = {"train": "training", "val": "validation", "test": "test"}
_DIGEST_LIMIT = 36  # the longest dataset digest MLflow stores


@dataclass(frozen=True)
class DataRef:
    """One split of the staged shards as MLflow knows it: metrics name their dataset by these."""

    name: str
    digest: str


def data_ref(manifest: Manifest, version: dict, split: str) -> DataRef:
    """`<source>-shards-<split>`, digested by DVC's .dir md5 of the shards folder, the hash
    `dvc pull` fetches them by; without one, the manifest's SHA-256 cut to MLflow's limit."""
    digest = version.get("dvc_md5") or str(version["manifest_sha256"])[:_DIGEST_LIMIT]
    return DataRef(f"{manifest.source.name}-shards-{split}", str(digest))


def shard_inputs(manifest: Manifest, version: dict, location: str, extra: dict[str, str]) -> list:
    """The three splits as MLflow dataset inputs, one per context, each sourced at the shards'
    folder or URL; extra (e.g. the DVC remote) goes into every profile. URLs are logged
    without a user:password@ part."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    remote = is_remote(location)
    # "local" and a URL's scheme are the source types of MLflow's own artifact sources, so
    # mlflow.data.get_source() resolves the logged source back to the shards.
    source_type = location.split("://", 1)[0] if remote else "local"
    source = json.dumps({"uri": masked(location)})
    inputs = []
    for split, context in CONTEXTS.items():
        ref = data_ref(manifest, version, split)
        profile = {
            "split": split,
            "samples": manifest.split_of(split).samples,
            "shards": len(manifest.shards(split)),
            "sample_shape": list(manifest.shape),
            "manifest_sha256": version["manifest_sha256"],
            **{k: masked(v) for k, v in extra.items()},
        }
        dataset = Dataset(ref.name, ref.digest, source_type, source, profile=json.dumps(profile))
        inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return inputs


def log_data_inputs(client, run_id: str, inputs: list) -> None:
    """Best effort: the data version is also in the run's data.* tags, so a tracking store
    that refuses the inputs costs the UI's dataset view, never the training."""
    try:
        client.log_inputs(run_id, datasets=inputs)
    except Exception as exc:  # noqa: BLE001 - see above
        log.warning("MLflow did not record the run's dataset inputs (%s); going on", _why(exc))


def evaluation_metrics(metrics: dict) -> dict[str, float]:
    """An evaluation's numbers as MLflow metrics: test_<name>, and test_kl_dim_<i> per latent."""
    out = {
        f"test_{k}": float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    out.update({f"test_kl_dim_{i}": float(v) for i, v in enumerate(metrics.get("kl_per_dim", []))})
    return out


def log_model_metrics(
    client, run_id: str, model_ids: list[str], metrics: dict[str, float], data: DataRef
) -> None:
    """The test metrics on each logged model, linked to the test split, so the model's page
    and search_logged_models show them. Best effort, like the dataset inputs: the same numbers
    are in the run's metrics and the versions' test.* tags."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(k, v, now, 0, model_id=m, dataset_name=data.name, dataset_digest=data.digest)
        for m in model_ids
        for k, v in sorted(metrics.items())
    ]
    try:
        client.log_batch(run_id, metrics=batch)  # the client chunks it
    except Exception as exc:  # noqa: BLE001 - see above
        log.warning("MLflow did not link the test metrics to the logged models (%s)", _why(exc))


def _why(exc: BaseException) -> str:
    return (str(exc).splitlines()[0][:200] if str(exc) else "") or type(exc).__name__


def training_run(s: Store, client, info: dict):
    """The MLflow run train_result.json names, in the store params point at; one line when it
    is not there (train logged to another store, or that store was replaced)."""
    from mlflow.exceptions import MlflowException

    run_id = info.get("mlflow_run_id")
    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        raise PipelineError(
            f"training run {run_id} (train_result.json) is not in {masked(s.uri)}"
            f" (train logged to {masked(str(info.get('tracking_uri')))}); use the same "
            "mlflow.tracking_uri (or MLFLOW_TRACKING_URI) as train, or re-run train"
        ) from exc
