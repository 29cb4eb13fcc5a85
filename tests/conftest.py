from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

# Ray Train's own telemetry (dashboard state reconciliation, Prometheus metrics, spot-preemption
# watcher, structured JSON logs) costs about 5 s of start-up per training run on 2 cores and is
# not what these tests check; the pipeline keeps Ray's defaults for users. Set before any Ray
# starts, so every cluster and CLI process the tests launch inherits it.
for _name in (
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION",
    "RAY_TRAIN_METRICS_ENABLED",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
    "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING",
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING",
):
    os.environ.setdefault(_name, "0")
# Ray Train gives a worker group 60 s to start; on 2 busy cores (servers and other Ray clusters
# starting beside it) a restart after a killed worker can take longer.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")


@pytest.fixture(scope="session", autouse=True)
def _migrated_sqlite_template(tmp_path_factory):
    """A fresh SQLite tracking database costs MLflow ~10 s of schema migrations on 2 busy
    cores, and most tests train into a database of their own. In this (pytest) process a
    fresh, empty SQLite file gets a copy of one migrated once per worker instead: the same
    tables MLflow would have made, with nothing in them. Subprocesses (the CLI, flows,
    servers) still migrate their own, so that path stays tested."""
    import shutil
    import threading

    import mlflow.store.db.utils as db_utils
    import mlflow.store.model_registry.sqlalchemy_store as registry_store
    import sqlalchemy

    original = db_utils._initialize_tables
    made: list[str] = []
    lock = threading.Lock()

    def initialize(engine) -> None:
        path = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
        if not path or path == ":memory:" or (os.path.exists(path) and os.path.getsize(path)):
            return original(engine)
        with lock:
            if not made:
                template = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
                fresh = sqlalchemy.create_engine(f"sqlite:///{template}")
                original(fresh)
                fresh.dispose()
                made.append(str(template))
        engine.dispose()
        shutil.copyfile(made[0], path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(db_utils, "_initialize_tables", initialize)
        patch.setattr(registry_store, "_initialize_tables", initialize)
        yield


@pytest.fixture(scope="session")
def local_ray():
    """One in-process Ray for the whole session (its start is the slow part); address="local"
    so it never joins a `ray start` cluster another test left for a moment."""
    import ray

    from pipelines.cluster import prepare_local_ray_env

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    prepare_local_ray_env()  # as the pipeline's own local Ray
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def small_params(tmp_path):
    """small_params(*overrides, preset=TRAINING, shards=None, ...): the repo's params.yaml with
    every output inside this test's tmp_path, a preset, then overrides. The presets, and
    `params_in` (whose keywords this passes on) for module and session fixtures or a sub-folder,
    are in tests/helpers/params.py."""
    from tests.helpers.params import TRAINING, params_in

    def build(*overrides: str, preset: tuple[str, ...] = TRAINING, **where):
        return params_in(tmp_path, *preset, *overrides, **where)

    return build


@pytest.fixture(scope="session")
def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits scaled to [0, 1] as (N, 1, 8, 8), split 70/10/20 with a fixed permutation."""
    x = torch.tensor(load_digits().data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    n_train, n_val = int(0.7 * len(x)), int(0.1 * len(x))
    return (
        x[order[:n_train]],
        x[order[n_train : n_train + n_val]],
        x[order[n_train + n_val :]],
    )


# Scheduling for `pytest -n N` (the Makefile's test command). A group runs on one worker, so a
# module's (or, for tests/infra, a directory's) expensive fixtures start once; the long,
# independent fault tests each form a group of their own. Groups run longest first so that
# neither worker is left with a long test at the end; the order is a hint for speed only,
# measured with --durations, and every test is independent of it.
_ONE_GROUP_PER_TEST = ("tests/training/test_fault_tolerance.py",)
_ONE_GROUP_PER_DIRECTORY = ("tests/infra",)  # one reference training shared by its modules
# Modules that share a package fixture: one group, so that it starts once (the Prefect server;
# the embedded retrain, whose repo the served deployment retrains).
_SHARED_GROUP = {
    "tests/orchestration/test_deployment_worker.py": "prefect_server",
    "tests/orchestration/test_served_deployment.py": "prefect_server",
    "tests/orchestration/test_cli_retrain.py": "prefect_server",
}
_LONGEST_FIRST = (
    "tests/training/test_fault_tolerance.py",
    "tests/orchestration/test_retrain_flow.py",
    "tests/infra",
    "tests/orchestration/test_deployment_worker.py",
    "tests/orchestration/test_served_deployment.py",
    "tests/orchestration/test_cli_retrain.py",
    "tests/orchestration/test_dvc_experiments.py",
    "tests/registry/test_concurrency.py",
    "tests/training/test_train_evaluate.py",
    "tests/training/test_sweep.py",
)


def _group(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    if path in _ONE_GROUP_PER_TEST:
        return nodeid
    if path in _SHARED_GROUP:
        return _SHARED_GROUP[path]
    for directory in _ONE_GROUP_PER_DIRECTORY:
        if path.startswith(directory + "/"):
            return directory
    return path


def _rank(nodeid: str) -> int:
    for i, prefix in enumerate(_LONGEST_FIRST):
        if nodeid.startswith(prefix):
            return i
    return len(_LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    # A stable sort keeps each module's tests together and in their written order, so module
    # fixtures are still set up once, with or without xdist.
    items.sort(key=lambda item: _rank(item.nodeid))


def pytest_xdist_make_scheduler(config, log):
    """xdist's loadscope scheduling with our groups as its scopes, in collection order. (Its
    loadgroup mode marks node ids, which pytest 9.2 no longer lets a plugin rewrite.)"""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    config.option.loadscopereorder = False
    return GroupScheduling(config, log)
