"""Typed parameters: `params.yaml` plus `--set section.key=value` overrides, validated by pydantic.

The CLI, `dvc.yaml` stages and Prefect flows all read their settings through `params_file.load_params`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    create_model,
    field_validator,
    model_validator,
)

from pipelines.errors import ParamsError
from pipelines.storage import check_url, resolve_in
from vae import ModelConfig, TrainConfig

# Upper bounds on sizes and counts: a typo (an extra zero, a missing unit) must fail in a
# second with one line, not allocate gigabytes or run for days before anything is said.
MAX_SIDE = 4096  # pixels per image side
MAX_WIDTH = 65536  # units per layer, latent dimensions, batch size
MAX_SAMPLES = 100_000  # Monte-Carlo / importance / bootstrap samples
MAX_MODEL_PARAMETERS = 1_000_000_000  # 4 GB of float32 weights


class _Section(BaseModel):
    # NaN and inf are never a setting (a NaN learning rate trains nothing, silently).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


Side = Annotated[int, Field(gt=0, le=MAX_SIDE)]
Width = Annotated[int, Field(gt=0, le=MAX_WIDTH)]
MAX_WORKERS = 4096
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
Workers = Annotated[int, Field(ge=1, le=MAX_WORKERS)]


class DataParams(_Section):
    source: Literal["digits", "mnist", "fashion_mnist", "array", "images", "sprites"] = "digits"
    path: str | None = None
    # sprites: how many (null: the full grid of 737,280); a larger size keeps the first ones.
    size: int | None = Field(None, gt=0, le=737_280)
    image_size: tuple[Side, Side] = (8, 8)  # (H, W)
    grayscale: bool = True
    # images: crop the centre to image_size's aspect ratio before resizing (no squashing).
    center_crop: bool = False
    binarize: bool = False
    shards_dir: str = Field("data/shards", min_length=1)
    # Shards hold about this many uncompressed bytes (gzip makes them smaller on disk).
    shard_bytes: int = Field(64_000_000, ge=1_000, le=10_000_000_000)
    # At most this many samples per shard (null: only shard_bytes decides).
    shard_size: int | None = Field(None, gt=0, le=10_000_000)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    # key_hash: val and test by a hash of each sample's key (stable as data grows). official:
    # the source's own train/test parts (mnist, fashion_mnist: figures compare with published
    # tables), val carved out of train by key hash (val_fraction of it; test_fraction unused).
    split: Literal["key_hash", "official"] = "key_hash"
    # Each split gets at least this many shards (smaller splits get smaller shards), so that
    # DDP ranks x loader workers all have a shard to read; staging also checks train scaling.
    min_shards_per_split: int = Field(2, ge=1, le=10_000)
    # Downloads (MNIST/Fashion-MNIST IDX files) are cached here, one folder per source.
    cache_dir: str = "data/raw"
    # Base URL of the four IDX files; null => the standard mirrors.
    download_url: str | None = None
    # Ray tasks that write the shards in parallel (byte-identical to one process), on the
    # cluster given (cluster.address, $RAY_ADDRESS) or a local Ray; 1: this process.
    stage_workers: int = Field(1, ge=1, le=1024)
    # Loader: samples held for shuffling per loader worker, and what a corrupt shard does.
    shuffle_buffer: int = Field(1000, ge=1, le=10_000_000)
    on_corrupt: Literal["raise", "skip"] = "raise"

    @model_validator(mode="after")
    def _official_parts_exist(self) -> DataParams:
        if self.split == "official" and self.source not in ("mnist", "fashion_mnist"):
            raise ValueError(
                f"split official needs a source with official train/test parts (mnist, "
                f"fashion_mnist), not {self.source}; use split: key_hash"
            )
        return self

    @field_validator("shards_dir")
    @classmethod
    def _names_a_folder(cls, v: str) -> str:
        # An empty or blank path resolves to the workspace itself, which staging would replace.
        if not v.strip():
            raise ValueError("shards_dir must name a folder, e.g. data/shards (it is empty)")
        return check_url(v)


def _section_from(
    config: type, bounds: dict[str, Any], exclude: frozenset[str] = frozenset()
) -> type[_Section]:
    """A params section whose fields, types and defaults are the `vae` dataclass's own (declared
    once, there); `bounds` adds the pipeline's limits (pydantic constraints; on a tuple field
    they apply to each item). Nested dataclasses become nested sections."""
    hints = get_type_hints(config, include_extras=True)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name in exclude:
            continue
        typ = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(typ):
            sub = _section_from(typ, bounds.get(f.name, {}))
            fields[f.name] = (sub, sub(**dataclasses.asdict(default)))
            continue
        bound = bounds.get(f.name)
        if bound is not None and get_origin(typ) is tuple:
            typ = tuple[Annotated[get_args(typ)[0], bound], ...]
        elif bound is not None:
            typ = Annotated[typ, bound]
        fields[f.name] = (typ, default)
    return create_model(f"{config.__name__}Params", __base__=_Section, **fields)


_ModelSection = _section_from(
    ModelConfig,
    exclude=frozenset({"input_shape"}),  # comes from the staged data
    bounds={
        "latent_dim": Field(gt=0, le=MAX_WIDTH),
        "hidden": Field(gt=0, le=MAX_WIDTH),
        "conv_channels": Field(gt=0, le=MAX_WIDTH),
        "sigma": Field(gt=0),
        "sigma_min": Field(gt=0),
        "beta": Field(ge=0),
        "mc_samples": Field(ge=1, le=MAX_SAMPLES),
        "free_bits": Field(ge=0, le=100),
        "noise": {"gaussian_std": Field(ge=0), "mask_prob": Field(ge=0, lt=1)},
    },
)


class ModelParams(_ModelSection):
    """`model:` — vae.ModelConfig's settings (less input_shape, which the data decides)."""

    def to_config(self, input_shape: tuple[int, ...]) -> ModelConfig:
        """The library's config for data of this example shape (validated there, and sized
        here: the weights are counted without being allocated)."""
        import torch

        from vae import build_model

        config = ModelConfig(input_shape=tuple(input_shape), **self.model_dump())
        with torch.device("meta"):
            n = sum(p.numel() for p in build_model(config).parameters())
        if n > MAX_MODEL_PARAMETERS:
            raise ParamsError(
                f"model: {n:,} weights for input {tuple(input_shape)} (model.hidden "
                f"{list(self.hidden)}, model.latent_dim {self.latent_dim}), over the "
                f"{MAX_MODEL_PARAMETERS:,} this pipeline trains; make model.hidden smaller"
            )
        return config


_TrainSection = _section_from(
    TrainConfig,
    bounds={
        "epochs": Field(gt=0, le=1_000_000),
        "batch_size": Field(gt=0, le=MAX_WIDTH),
        "lr": Field(gt=0),
        "weight_decay": Field(ge=0),
        "kl_warmup_epochs": Field(ge=0),
        "grad_clip_norm": Field(gt=0),
        "seed": Field(ge=0, le=MAX_SEED),
        "early_stopping_patience": Field(ge=1),
        "min_delta": Field(ge=0),
        "batch_parts": Field(ge=1, le=MAX_WORKERS),
    },
)


class TrainParams(_TrainSection):
    """`train:` — vae.TrainConfig's optimisation settings; where it runs is `cluster:`."""

    def to_config(self) -> TrainConfig:
        return TrainConfig(**self.model_dump())

    def parts_on(self, cluster: ClusterParams) -> int:
        """batch_parts, or one part per worker where it is null (the model then depends on
        the worker count): what training computes and what staging cuts shards for."""
        return self.batch_parts or cluster.max_workers


class ClusterParams(_Section):
    """`cluster:` — where and how Ray Train runs the training: scale, hardware, checkpoints."""

    # DDP ranks. At least 1: Ray's in-driver local mode (0) keeps no checkpoints, so it could
    # neither resume nor export; `quickstart` trains in-process. [min, max]: elastic training
    # (Ray Train starts with what fits, at least min, goes on without lost nodes, grows back).
    num_workers: int | tuple[Workers, Workers] = Field(1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0, le=1024)
    loader_workers: int = Field(0, ge=0, le=64)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # mixed precision applies on GPU only
    # Checkpoints: a local folder, or shared storage (s3://, NFS) for multi-node clusters.
    storage_path: str = Field("runs", min_length=1)
    # Same run name => resume from its latest checkpoint. Default: derived from params + data.
    run_name: str | None = None
    max_failures: int = Field(2, ge=0, le=1000)
    # Ray cluster: null => RAY_ADDRESS if set, else a local Ray started in-process.
    address: str | None = None

    _storage_url = field_validator("storage_path")(lambda v: check_url(v))

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> int | tuple[int, int]:
        """A count, or [min, max] for elastic training; [n, n] is plain n."""
        counts = list(value) if isinstance(value, list | tuple) else [value]
        ok = len(counts) in (1, 2) and all(
            isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_WORKERS for n in counts
        )
        if not ok or counts[0] > counts[-1]:
            raise ValueError(
                f"must be a worker count from 1 to {MAX_WORKERS}, or [min, max] with "
                "min <= max for elastic training"
            )
        return counts[0] if counts[0] == counts[-1] else (counts[0], counts[1])

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return not isinstance(self.num_workers, int)

    def workers_text(self) -> str:
        """The setting as users write it: 2, or [1, 2] for elastic."""
        return (
            f"[{self.min_workers}, {self.max_workers}]" if self.elastic else str(self.num_workers)
        )


class EvaluateParams(_Section):
    iw_k: int = Field(1000, ge=0, le=MAX_SAMPLES)
    # Test examples the IW estimate averages over, a fixed subsample chosen by key hash (its
    # standard error is reported); null: the whole test split, as in papers.
    iw_examples: int | None = Field(2000, ge=1, le=10**9)
    batch_size: int = Field(256, gt=0, le=MAX_WIDTH)
    seed: int = Field(0, ge=0, le=MAX_SEED)


class MlflowParams(_Section):
    # null => MLFLOW_TRACKING_URI if set, else SQLite at <root>/mlflow.db (embedded default).
    tracking_uri: str | None = None
    experiment: str = "vae-pipeline"


class RegisterParams(_Section):
    # Registered models are <name>-encoder and <name>-decoder.
    name: str = Field("digits-vae", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # Nats per test example by which the new model's -ELBO must beat the champion's.
    margin: float = Field(0.0, ge=0)
    # true: the whole bootstrap CI of the paired difference must lie below -margin;
    # false: its mean is enough.
    require_ci: bool = True
    bootstrap_samples: int = Field(1000, ge=10, le=MAX_SAMPLES)
    confidence: float = Field(0.95, gt=0, lt=1)
    # z samples per example for the gate's -ELBO (more samples: a tighter CI).
    mc_samples: int = Field(8, ge=1, le=10_000)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    # Seconds to wait for another registration to finish moving aliases.
    lock_timeout_s: float = Field(600, gt=0, le=86_400)
    # Under `dvc exp run` (DVC_EXP_NAME set): false registers nothing, so a sweep of
    # experiments neither fills the registry nor moves the champion; true registers each.
    in_experiments: bool = False


class EmbedParams(_Section):
    # Encoder to use: an alias (champion), a version number, or a models:/ URI.
    model: str = "champion"
    # null => data.shards_dir; or another shards folder, or a .npy/.npz array file.
    source: str | None = None
    split: Literal["all", "train", "val", "test"] = "all"  # shards only
    # null => <outputs_dir>/embed/embeddings.parquet (the sidecar: same name, .json)
    output: str | None = None
    include_logvar: bool = False

    _urls = field_validator("source", "output")(lambda v: v if v is None else check_url(v))
    batch_size: int = Field(256, gt=0)
    # Ray Data inference actors, each holding one copy of the model.
    concurrency: int = Field(2, ge=1)
    cpus_per_actor: float = Field(1, gt=0)
    # Shards of another data version than the encoder was trained on are refused unless true
    # (e.g. new data embedded before the next retrain). Array files carry no data version.
    allow_other_data: bool = False
    # The retrain flow embeds with each newly promoted champion (a challenger embeds nothing),
    # so downstream tables follow the champion; `similar` refuses a table of an older encoder.
    on_promotion: bool = True


class RetentionParams(_Section):
    """What the retrain flow prunes after each run. Never the champion, its training run's
    checkpoints, any MLflow run, or a folder or version the pipeline did not make."""

    # Checkpoint folders under cluster.storage_path: the newest N training runs' stay, and the
    # champion's always; null keeps every run's.
    keep_runs: int | None = Field(5, ge=1)
    # Registered versions the gate made challengers (never promoted), per model, newest first;
    # null keeps all. Champions and former champions stay: they are the rollback path.
    keep_challengers: int | None = Field(10, ge=0)
    # Nothing younger than this is pruned: a run folder another model's retrain (sharing the
    # storage path) is still writing must not vanish under it.
    min_age_hours: float = Field(24, ge=0)


_CRON_FIELD = re.compile(r"^[0-9A-Za-z*/,?#-]+$")


class ScheduleParams(_Section):
    """When `vae-pipeline serve` and prefect.yaml run the retrain flow."""

    # Five-field cron (minute hour day-of-month month day-of-week); Prefect checks it fully.
    cron: str = "0 3 * * *"
    timezone: str = "UTC"  # IANA name: the cron is read in this zone
    deployment: str = Field("retrain-nightly", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        fields = v.split()
        if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
            raise ValueError("cron needs five fields: minute hour day-of-month month weekday")
        return v

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError("timezone must be an IANA name such as UTC or Europe/Paris") from exc
        return v


class Params(_Section):
    # Dumps (MLflow params, hashes) use the params.yaml names, e.g. `register` below.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, serialize_by_alias=True)

    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    cluster: ClusterParams = ClusterParams()
    evaluate: EvaluateParams = EvaluateParams()
    mlflow: MlflowParams = MlflowParams()
    # Written `register:` in params.yaml; a field named `register` would shadow
    # BaseModel.register (pydantic warns on every import).
    registry: RegisterParams = Field(RegisterParams(), alias="register")
    embed: EmbedParams = EmbedParams()
    schedule: ScheduleParams = ScheduleParams()
    retention: RetentionParams = RetentionParams()
    # Where stage outputs (models, metrics, figures) go, relative to root.
    outputs_dir: str = Field("outputs", min_length=1)
    # Folder that relative paths are resolved against (the folder of params.yaml).
    root: Path = Field(default_factory=Path.cwd, exclude=True)

    def resolve(self, path: str | Path) -> Path:
        return resolve_in(self.root, path)
