"""The model registry as downstream jobs see it: names, model references, our plain weights.

Every registered version, encoder or decoder, holds two things:
- an MLflow pytorch model in the pt2 (exported program) format, which loads with plain
  `mlflow.pytorch.load_model` / `mlflow.pyfunc.load_model` and no code of ours;
- under `extra_files/`, the whole Autoencoder as `model.safetensors` + `config.json`, which
  `vae.load_model` reads (the gate and the embed/generate jobs use this path).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pipelines import tracking, tracking_checks
from pipelines.errors import PipelineError
from pipelines.params import Params
from vae import Autoencoder, load_model

ROLES = ("encoder", "decoder")
CHAMPION = "champion"
CHALLENGER = "challenger"
WEIGHTS_DIR = "extra_files"  # where MLflow puts a logged model's extra_files
_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_MODELS_URI = re.compile(
    r"^models:/(?P<name>[^/@\s]+)(?:@(?P<alias>[A-Za-z][A-Za-z0-9_-]*)|/(?P<version>\d+))$"
)


def model_name(name: str, role: str) -> str:
    """register.name's model for a role: <name>-encoder, <name>-decoder."""
    return f"{name}-{role}"


@dataclass(frozen=True)
class ModelRegistry:
    """Where the pair is registered: the tracking store and register.name."""

    store: tracking.Store
    name: str

    def model_name(self, role: str) -> str:
        return model_name(self.name, role)


def registry_of(params: Params) -> ModelRegistry:
    return ModelRegistry(tracking.store_of(params), params.registry.name)


@dataclass
class RegisteredVersion:
    name: str
    version: str
    run_id: str | None
    requested: str  # what the user asked for, e.g. models:/digits-vae-encoder@champion
    tags: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def parse_ref(name: str, role: str, ref: str | None) -> tuple[str, str | None, str | None]:
    """(name, alias, version) from an alias, a version number or a models:/ URI."""
    ref = (ref or CHAMPION).strip()
    if ref.startswith("models:/"):
        m = _MODELS_URI.match(ref)
        if m is None:
            raise PipelineError(
                f"model URI {ref!r} is malformed; use models:/<name>@<alias> or "
                f"models:/<name>/<version>, e.g. models:/{model_name(name, role)}@champion"
            )
        return m["name"], m["alias"], m["version"]
    if ref.isdigit():
        return model_name(name, role), None, ref
    if _ALIAS.match(ref):
        return model_name(name, role), ref, None
    raise PipelineError(
        f"model reference {ref!r} is neither an alias (champion), a version number nor a "
        "models:/ URI"
    )


def _missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def resolve(reg: ModelRegistry, role: str, ref: str | None = None) -> RegisteredVersion:
    """The registered version a reference points at; one-line errors when there is none."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_ref(reg.name, role, ref)
    requested = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    tracking_checks.check_reachable(reg.store)
    client = tracking.client(reg.store)
    where = reg.store.uri
    hint = "run 'vae-pipeline register' first" if alias in (CHAMPION, None) else "check the alias"
    if alias:
        version = alias_version(client, name, alias)
        if version is None:
            raise PipelineError(
                f"registered model {name} has no '{alias}' alias in {where}; {hint}"
            )
    try:
        mv = client.get_model_version(name, version)
    except MlflowException as exc:
        if not _missing(exc):
            raise
        raise PipelineError(
            f"registered model {name} has no version {version} in {where}; pick an existing "
            "version (MLflow UI, Models tab) or the alias 'champion'"
        ) from exc
    return RegisteredVersion(
        name=mv.name,
        version=str(mv.version),
        run_id=mv.run_id,
        requested=requested,
        tags=dict(mv.tags or {}),
        aliases=list(getattr(mv, "aliases", []) or []),
    )


def alias_version(client, name: str, alias: str) -> str | None:
    """The version holding an alias, or None (no such alias, or no such registered model)."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException as exc:
        if _missing(exc):
            return None
        raise
    # A missing alias is an error with a vague code in some stores: read the map instead.
    version = aliases.get(alias)
    return None if version is None else str(version)


def download_weights(s: tracking.Store, version: RegisteredVersion, dst: Path) -> Path:
    """Our plain weights folder of a registered version, downloaded under dst."""
    import mlflow
    from mlflow.exceptions import MlflowException

    # models:/ URIs resolve through the global registry URI whatever is passed here
    # (MLflow 3.17), so ask our client where the version's files are and fetch only ours.
    location = tracking.client(s).get_model_version_download_uri(version.name, version.version)
    saved = os.environ.get(_BAR)
    os.environ[_BAR] = "false"  # a progress bar for two small files is noise
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{location.rstrip('/')}/{WEIGHTS_DIR}",
            dst_path=str(dst),
            tracking_uri=s.uri,
        )
    except (MlflowException, OSError):
        local = str(dst / "missing")
    finally:
        if saved is None:
            os.environ.pop(_BAR, None)
        else:
            os.environ[_BAR] = saved
    weights = Path(local)
    if not (weights / "model.safetensors").is_file():
        raise PipelineError(
            f"{version.uri} holds no plain weights ({WEIGHTS_DIR}/model.safetensors); it was "
            "not registered by 'vae-pipeline register'"
        )
    return weights


@contextmanager
def registered_weights(
    reg: ModelRegistry, role: str, ref: str | None = None
) -> Iterator[tuple[Path, RegisteredVersion]]:
    """A temporary local copy of a registered version's plain weights."""
    version = resolve(reg, role, ref)
    with tempfile.TemporaryDirectory(prefix="vae-registry-") as tmp:
        yield download_weights(reg.store, version, Path(tmp)), version


def load_registered(
    reg: ModelRegistry, role: str, ref: str | None = None
) -> tuple[Autoencoder, RegisteredVersion]:
    """The registered model through our own loader (eval mode, CPU)."""
    with registered_weights(reg, role, ref) as (weights, version):
        return load_model(weights), version
