"""Small params for tests, built one way: the repo's params.yaml with every path the pipeline
writes inside one folder (`params_in`), a preset of small settings, then the test's own
overrides (a later override wins). Start a new test from the `small_params` fixture
(tests/conftest.py), or from `params_in` in a module or session fixture or for a sub-folder of
the test's own; a test that runs the CLI or a flow takes the same overrides as a list from
`overrides_in` (through `set_args` for a command line).

The presets differ on purpose, and each says what it is for; the suite's speed and the
tests' meaning depend on their values, so change one only for its own tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from pipelines.params import Params
from pipelines.params_file import load_params

REPO = Path(__file__).resolve().parents[2]
PARAMS_FILE = REPO / "params.yaml"

# tests/data: the repo's own data, model and cluster settings (the paths aside): staging is
# checked at the defaults a user gets.
DEFAULTS: tuple[str, ...] = ()
# A model that trains in seconds on the digits.
SMALL_MODEL = ("model.hidden=[64]", "model.latent_dim=4")
# tests/training: train and evaluate on Ray, two workers, a few epochs.
TRAINING = (
    *SMALL_MODEL,
    "train.epochs=3",
    "train.batch_size=64",
    "cluster.num_workers=2",
    "evaluate.iw_k=20",
)
# tests/orchestration: whole flows (stage, train, evaluate, register) on one worker; promotion
# embeddings only where they are the point (test_deployment_worker).
FLOW = (
    *SMALL_MODEL,
    "train.epochs=2",
    "cluster.num_workers=1",
    "evaluate.iw_k=10",
    "register.bootstrap_samples=200",
    "register.mc_samples=2",
    "embed.on_promotion=false",
)
# tests/infra: one training through the CLI on a Ray cluster of 2 workers of 1 CPU each.
CLUSTER = (*SMALL_MODEL, "train.epochs=2", "cluster.num_workers=2", "cluster.cpus_per_worker=1")
# tests/registry: models fitted in-process and scored on one worker; latent 6 and 300
# bootstrap samples keep the gate's verdicts between weak and strong models clear-cut.
REGISTRY_LATENT = 6
REGISTRY = (
    "model.hidden=[64]",
    f"model.latent_dim={REGISTRY_LATENT}",
    "evaluate.iw_k=0",
    "register.bootstrap_samples=300",
    "register.mc_samples=2",
    "cluster.num_workers=1",
)
# tests/reliability: the workspace to damage; cheapest settings, baked into its params.yaml.
WORKSPACE = (
    "model.hidden=[32]",
    "model.latent_dim=4",
    "evaluate.iw_k=0",
    "register.bootstrap_samples=100",
    "register.mc_samples=1",
)


def paths_inside(
    folder: Path, *, shards: Path | None = None, data: Path | None = None, db: str = "mlflow.db"
) -> list[str]:
    """Overrides that put every path the pipeline writes inside folder: the shards and the
    download cache (in `data`, default folder; the shards at `shards` if given), the outputs,
    Ray's run storage and the MLflow store (SQLite file `db`)."""
    data = data or folder
    return [
        f"data.shards_dir={shards or data / 'shards'}",
        f"data.cache_dir={data / 'raw'}",
        f"outputs_dir={folder / 'outputs'}",
        f"cluster.storage_path={folder / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{folder / db}",
    ]


def overrides_in(
    folder: Path,
    *overrides: str,
    shards: Path | None = None,
    data: Path | None = None,
    db: str = "mlflow.db",
) -> list[str]:
    """paths_inside(folder), then overrides: what params_in loads, as a list for a command
    line (set_args) or a flow's overrides."""
    return [*paths_inside(folder, shards=shards, data=data, db=db), *overrides]


def params_in(
    folder: Path,
    *overrides: str,
    shards: Path | None = None,
    data: Path | None = None,
    db: str = "mlflow.db",
    own_root: bool = False,
) -> Params:
    """The repo's params.yaml with every output inside folder, then overrides: pass a preset
    first, e.g. params_in(tmp, *TRAINING, "train.epochs=1"). own_root: load a copy of it made
    in folder instead, so that params.root is folder and what the pipeline finds from the root
    (relative paths, data.dvc, git) is folder's, never the repo's; a command line then takes
    --params folder/params.yaml."""
    params_file = PARAMS_FILE
    if own_root:
        folder.mkdir(parents=True, exist_ok=True)
        params_file = folder / "params.yaml"
        if not params_file.exists():
            shutil.copy(PARAMS_FILE, params_file)
    return load_params(
        params_file, overrides_in(folder, *overrides, shards=shards, data=data, db=db)
    )


def set_args(overrides: Iterable[str]) -> list[str]:
    """The overrides as the CLI takes them: --set KEY=VALUE for each."""
    return [arg for override in overrides for arg in ("--set", override)]
