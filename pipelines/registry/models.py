"""The model registry as downstream jobs see it: names, model references, registered models.

Every registered version, encoder or decoder, holds two things:
- an MLflow pytorch model in the pt2 (exported program) format, which loads with plain
  `mlflow.pytorch.load_model` / `mlflow.pyfunc.load_model` and no code of ours; its metadata
  holds the export format and the ModelConfig;
- under `extra_files/`, the whole Autoencoder as `model.safetensors` + `config.json`, for
  people who use `vae.load_model`.
The jobs that use a registered model (embed, generate, the promotion gate) run only the pt2
programs, loaded with `mlflow.pytorch.load_model`, through `RegisteredModel`: what a serving
team loads is what the pipeline exercises.
"""

from __future__ import annotations

import copy
import os
import pickle
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx
from torch import Tensor, nn

from pipelines import tracking, tracking_checks
from pipelines.errors import PipelineError
from pipelines.params import Params
from vae import Autoencoder, ModelConfig
from vae.likelihoods import build_likelihood

ROLES = ("encoder", "decoder")
# What the pt2 programs compute, in their metadata: 2 = the decoder gives the likelihood's
# parameters (before: mean images, and no ModelConfig in the metadata).
EXPORT_FORMAT = 2
CHAMPION = "champion"
CHALLENGER = "challenger"
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


def model_metadata(config: ModelConfig, role: str) -> dict[str, str | int]:
    """What a logged model's MLmodel metadata holds for RegisteredModel to rebuild it from."""
    return {"vae_format": EXPORT_FORMAT, "vae_role": role, "vae_config": config.to_json()}


# -- registered models, loaded through MLflow ----------------------------------------------------


class RegisteredModel(Autoencoder):
    """A registered encoder and/or decoder as the Autoencoder that `vae`'s scoring, sampling and
    embedding call: its networks are the pt2 programs `mlflow.pytorch.load_model` returns, its
    config comes from their MLflow metadata, and the likelihood (with a learned sigma read from
    the decoder program's state) and every input check are `vae`'s own.

    It travels to Ray tasks and actors as those programs' graphs and tensors (see __reduce__)."""

    def __init__(
        self,
        config: ModelConfig,
        programs: dict[str, nn.Module],
        where: str,
        likelihood_state: dict[str, Tensor] | None = None,
    ) -> None:
        # nn.Module's, not Autoencoder's __init__: the networks come from MLflow, none built here.
        nn.Module.__init__(self)
        self.config = config
        self.where = where  # the versions, for error lines
        self.programs = nn.ModuleDict(programs)
        self.likelihood = build_likelihood(config)
        if likelihood_state is None and "decoder" in self.programs:
            state = self.programs["decoder"].state_dict()
            prefix = "model.likelihood."
            likelihood_state = {
                k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)
            }
        if likelihood_state is not None:
            self.likelihood.load_state_dict(likelihood_state)
        self.eval()

    @classmethod
    def from_files(
        cls, config: ModelConfig, files: dict[str, dict[str, bytes]], where: str
    ) -> RegisteredModel:
        """From each role's MLflow model files (relative path -> bytes), loaded with MLflow."""
        return cls(config, {role: _load_program(f, where) for role, f in files.items()}, where)

    def __reduce__(self):
        # The module torch.export.load returns holds closures that do not pickle, and loading
        # the program again in every Ray actor costs seconds of imports (MLflow, torch.export):
        # what travels is the same graph and tensors as plain GraphModules, without the
        # program's input-shape guard (prepare_input checks the shape before the graph runs).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's pytree spec, copied
            payload = pickle.dumps({role: _portable(p) for role, p in self.programs.items()})
        # The likelihood's state travels on its own: a portable graph keeps only the tensors its
        # graph reads, and a fixed sigma is a buffer the decoder never reads (a second trip,
        # as through Ray Client's proxy, would otherwise lose it).
        state = self.likelihood.state_dict() if "decoder" in self.programs else None
        return (_unpickled, (self.config, payload, self.where, state))

    def train(self, mode: bool = True) -> RegisteredModel:
        # Exported programs refuse train()/eval(): they are fixed inference graphs already.
        self.training = mode
        return self

    def _program(self, role: str) -> nn.Module:
        if role not in self.programs:
            raise PipelineError(f"{self.where} holds no {role}; load the {role} as well")
        return self.programs[role]

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        out = self._program("encoder")(x.reshape(x.shape[0], *self.config.input_shape))
        latent = self.config.latent_dim
        if self.config.variational:
            return out[:, :latent], out[:, latent:]
        return out, None

    def decode(self, z: Tensor) -> Tensor:
        """z (..., B, L) -> (..., B, D): the program takes (N, L), so the sample axes are merged."""
        lead = z.shape[:-1]
        out = self._program("decoder")(z.reshape(-1, z.shape[-1]))
        return out.reshape(*lead, self.config.input_dim)


def _portable(program: nn.Module) -> torch.fx.GraphModule:
    """program's graph and tensors as a plain GraphModule, minus the guard call."""
    graph = copy.deepcopy(program.graph)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    return torch.fx.GraphModule(program, graph)


def _unpickled(config: ModelConfig, payload: bytes, where: str, likelihood_state=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        programs = pickle.loads(payload)  # noqa: S301 - our own payload, from __reduce__
    return RegisteredModel(config, programs, where, likelihood_state)


def _load_program(files: dict[str, bytes], where: str) -> nn.Module:
    """mlflow.pytorch.load_model on a version's MLflow model files, written to a temp folder."""
    import mlflow.pytorch

    with tempfile.TemporaryDirectory(prefix="vae-registry-") as tmp:
        for rel, data in files.items():
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / rel).write_bytes(data)
        try:
            return mlflow.pytorch.load_model(tmp)
        except Exception as exc:  # whatever a damaged program raises: one line, the version
            raise PipelineError(
                f"{where}'s pt2 program does not load with mlflow.pytorch.load_model "
                f"({_first_line(exc)}); re-register it with 'vae-pipeline register'"
            ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _model_files(s: tracking.Store, version: RegisteredVersion) -> dict[str, bytes]:
    """A version's MLflow model as relative path -> bytes: its MLmodel and its data/ folder
    (the pt2 program), not extra_files (weights for other tools)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    # models:/ URIs resolve through the global registry URI whatever is passed (MLflow 3.17),
    # so ask our client where the version's files are.
    location = tracking.client(s).get_model_version_download_uri(version.name, version.version)
    saved = os.environ.get(_BAR)
    os.environ[_BAR] = "false"  # a progress bar for two small files is noise
    try:
        with tempfile.TemporaryDirectory(prefix="vae-registry-") as tmp:
            for part in ("MLmodel", "data"):
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{location.rstrip('/')}/{part}", dst_path=tmp, tracking_uri=s.uri
                )
            root = Path(tmp)
            return {
                str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()
            }
    except (MlflowException, OSError) as exc:
        raise PipelineError(
            f"{version.uri}'s MLflow model cannot be downloaded ({_first_line(exc)}); check the "
            "artifact store, or re-register the model"
        ) from exc
    finally:
        if saved is None:
            os.environ.pop(_BAR, None)
        else:
            os.environ[_BAR] = saved


class OlderExport(PipelineError):
    """A version whose pt2 programs predate EXPORT_FORMAT (or were not exported by us)."""


def _config_of(files: dict[str, bytes], version: RegisteredVersion, role: str) -> ModelConfig:
    """The ModelConfig in a version's MLflow metadata; older exports have none: re-register."""
    import yaml

    meta = (yaml.safe_load(files.get("MLmodel", b"")) or {}).get("metadata") or {}
    if meta.get("vae_format") != EXPORT_FORMAT or meta.get("vae_role") != role:
        raise OlderExport(
            f"{version.uri} has no {role} of export format {EXPORT_FORMAT} in its MLflow "
            "metadata (registered by an older vae-pipeline, or not by it); re-register its "
            "training run with 'vae-pipeline register'"
        )
    return ModelConfig.from_json(meta["vae_config"])


def _load_versions(reg: ModelRegistry, versions: dict[str, RegisteredVersion]) -> RegisteredModel:
    files = {role: _model_files(reg.store, v) for role, v in versions.items()}
    configs = {role: _config_of(files[role], v, role) for role, v in versions.items()}
    where = " + ".join(v.uri for v in versions.values())
    if len({c.to_json() for c in configs.values()}) != 1:
        raise PipelineError(f"{where} are not one model (their configs differ); re-register")
    model = RegisteredModel.from_files(next(iter(configs.values())), files, where)
    _check_shapes(model)
    return model


@torch.no_grad()
def _check_shapes(model: RegisteredModel) -> None:
    """Each program's output on a batch of 3 has the shape its metadata promises."""
    cfg = model.config
    width = cfg.latent_dim * (2 if cfg.variational else 1)
    checks = {
        "encoder": (torch.zeros(3, *cfg.input_shape), (3, width)),
        "decoder": (torch.zeros(3, cfg.latent_dim), (3, *cfg.input_shape)),
    }
    for role, program in model.programs.items():
        x, want = checks[role]
        try:
            got = tuple(program(x).shape)
        except Exception as exc:  # a graph that fails to run: one line, the version
            raise PipelineError(
                f"{model.where}'s pt2 {role} fails on a batch of 3 ({_first_line(exc)}); "
                "re-register it with 'vae-pipeline register'"
            ) from exc
        if got != want:
            raise PipelineError(
                f"{model.where}'s pt2 {role} gives shape {got}, not {want} as its metadata "
                "says; re-register it with 'vae-pipeline register'"
            )


def load_registered(
    reg: ModelRegistry, role: str, ref: str | None = None
) -> tuple[RegisteredModel, RegisteredVersion]:
    """One registered encoder or decoder (default: champion), loaded through MLflow."""
    version = resolve(reg, role, ref)
    return _load_versions(reg, {role: version}), version


def load_pair(
    reg: ModelRegistry, ref: str | None = None
) -> tuple[RegisteredModel, RegisteredVersion]:
    """A registered encoder and the decoder registered with it (its vae.pair tag), as one model;
    returns the encoder's version."""
    encoder = resolve(reg, "encoder", ref)
    pair = encoder.tags.get("vae.pair")
    if not pair:
        raise PipelineError(f"{encoder.uri} has no vae.pair tag naming its decoder; re-register")
    decoder = resolve(reg, "decoder", pair)
    return _load_versions(reg, {"encoder": encoder, "decoder": decoder}), encoder
