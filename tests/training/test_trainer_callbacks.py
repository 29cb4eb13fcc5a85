"""The trainer leaves out Ray Train's placement-group cleaner only where it cannot work: on a
cluster with no Ray dashboard, whose state API the cleaner polls to learn whether the
controller lives (each poll then waits about 20 s, and stopping the cleaner held every
training's end 12 s). Where a dashboard answers, Ray Train's defaults stay as they are. With
no Ray Dataset to hand the workers (ours read shards themselves), it also leaves out the
datasets callback, whose DatasetManager actor started before every training's first step."""

from __future__ import annotations

import os
import socket

import pytest

from pipelines.cluster import serves_state_api
from pipelines.training.driver import _trainer_class

pytestmark = pytest.mark.slow

CLEANER = "PlacementGroupCleanerCallback"
DATASETS = "DatasetsCallback"


def _callbacks(**kwargs) -> set[str]:
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = _trainer_class(TorchTrainer)(
        lambda: None, scaling_config=ScalingConfig(num_workers=1), **kwargs
    )
    return {type(c).__name__ for c in trainer._create_default_callbacks()}


def test_a_ray_without_a_dashboard_trains_without_the_cleaner_and_keeps_the_rest(local_ray):
    assert not serves_state_api()
    names = _callbacks()
    assert CLEANER not in names and DATASETS not in names
    assert {"BackendSetupCallback", "AcceleratorSetupCallback"} <= names


def test_a_trainer_given_a_ray_dataset_keeps_the_datasets_callback(local_ray):
    import ray.data

    assert DATASETS in _callbacks(datasets={"train": ray.data.range(4)})


def test_a_cluster_whose_dashboard_answers_keeps_the_cleaner(local_ray):
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get, _internal_kv_put

    key, space = ray_constants.DASHBOARD_ADDRESS, ray_constants.KV_NAMESPACE_DASHBOARD
    recorded = _internal_kv_get(key, namespace=space)
    with socket.socket() as dashboard:  # stands in for the dashboard: it takes connections
        dashboard.bind(("127.0.0.1", 0))
        dashboard.listen()
        port = dashboard.getsockname()[1]
        _internal_kv_put(key, f"127.0.0.1:{port}", overwrite=True, namespace=space)
        try:
            assert serves_state_api()
            assert CLEANER in _callbacks()
        finally:
            if recorded is None:
                _internal_kv_del(key, namespace=space)
            else:
                _internal_kv_put(key, recorded, overwrite=True, namespace=space)


def test_a_ray_of_our_own_starts_its_workers_without_the_preemption_watcher(local_ray):
    """One machine has no node to drain: Ray Train's controller, a worker of this Ray, reads
    the switch from its environment and starts no watcher process per training."""
    from pipelines.cluster import LOCAL_RAY_ENV

    @local_ray.remote(num_cpus=0)
    def switch() -> str | None:
        import os

        return os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")

    assert LOCAL_RAY_ENV == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    assert local_ray.get(switch.remote()) == "0"


def test_a_watcher_setting_of_the_users_own_is_kept(monkeypatch):
    from pipelines.cluster import prepare_local_ray_env

    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    prepare_local_ray_env()
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"
