"""Security basics that need no service: credentials never logged, no pickle from disk runs."""

from __future__ import annotations

import pytest
import torch

from pipelines.errors import PipelineError
from pipelines.params_file import load_params
from pipelines.tracking import flat_params
from pipelines.training.worker import load_state


def test_credentials_in_uris_are_masked_in_the_logged_params():
    params = load_params(
        "params.yaml",
        [
            "mlflow.tracking_uri=https://alice:hunter2@mlflow.example.com",
            "cluster.address=ray://deploy-token@head:10001",
        ],
    )
    logged = flat_params(params)
    assert logged["mlflow.tracking_uri"] == "https://***@mlflow.example.com"
    assert logged["cluster.address"] == "ray://***@head:10001"
    assert not any("hunter2" in v or "deploy-token" in v for v in logged.values())


class _RunsCode:
    """Unpickling this would run `marker.touch()`: what a tampered checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_a_checkpoint_holding_arbitrary_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    state = tmp_path / "state.pt"
    torch.save({"model": {}, "payload": _RunsCode(marker)}, state)

    with pytest.raises(PipelineError, match="not a plain tensor checkpoint") as err:
        load_state(state)
    assert "\n" not in str(err.value)
    assert not marker.exists(), "the pickle's code ran"


def test_a_plain_checkpoint_still_loads(tmp_path):
    state = tmp_path / "state.pt"
    torch.save({"epoch": 3, "history": [{"epoch": 0, "loss": 1.5}], "w": torch.ones(2)}, state)
    loaded = load_state(state)
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], torch.ones(2))
