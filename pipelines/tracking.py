"""MLflow tracking: where runs go, and one MLflow run per training run name (resumable).

Nothing here runs at import time: the tracking URI is resolved when a stage asks for it.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

from pipelines.errors import PipelineError
from pipelines.params import Params

# Names of environment variables whose values must never reach MLflow params, tags or logs.
_SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIAL|AUTH)", re.IGNORECASE)
# user:password@ in a URI (a tracking server, a Ray address): logged without it.
_URI_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def tracking_uri(params: Params) -> str:
    """params.mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else SQLite beside params.yaml.

    The SQLite path is absolute because Ray workers change directory.
    """
    uri = params.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{params.resolve('mlflow.db')}"


def artifact_location(params: Params) -> str | None:
    """Local artifact root beside the SQLite file (a tracking server manages its own)."""
    uri = tracking_uri(params)
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def client(params: Params):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri(params))


def check_reachable(params: Params) -> None:
    """Fail fast, in one line, when a tracking server does not answer."""
    uri = tracking_uri(params)
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException as exc:
        raise PipelineError(
            f"MLflow tracking server {uri} is unreachable ({type(exc).__name__}); start it "
            "(python infra/local/stack.py up) or set MLFLOW_TRACKING_URI to a running server"
        ) from exc


def experiment_id(params: Params) -> str:
    c = client(params)
    exp = c.get_experiment_by_name(params.mlflow.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(
            params.mlflow.experiment, artifact_location=artifact_location(params)
        )
    except Exception:  # created concurrently by another process: use theirs
        exp = c.get_experiment_by_name(params.mlflow.experiment)
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


def start_or_resume_run(params: Params, run_name: str, run_dir: Path, tags: dict[str, str]) -> str:
    """The MLflow run for this training run: the one recorded in run_dir, or a new one.

    The run id is kept in a file beside the checkpoints rather than found by searching run
    names, so a resumed training continues exactly its own MLflow run.
    """
    id_file = run_dir / "mlflow_run_id"
    c = client(params)
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        try:
            c.get_run(run_id)
            c.update_run(run_id, status="RUNNING")
            return run_id
        except Exception:
            pass  # the tracking store was reset: start a new run below
    run = c.create_run(experiment_id(params), run_name=run_name, tags=tags)
    run_id = run.info.run_id
    items = sorted(flat_params(params).items())
    from mlflow.entities import Param

    for start in range(0, len(items), 100):
        c.log_batch(run_id, params=[Param(k, v) for k, v in items[start : start + 100]])
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = id_file.with_suffix(".tmp")
    tmp.write_text(run_id)
    os.replace(tmp, id_file)
    return run_id
