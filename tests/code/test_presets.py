"""Named presets: every one loads into valid params and a buildable model; --set wins; an
unknown name is one line."""

from __future__ import annotations

import json

import pytest

from pipelines.cli import main
from pipelines.params_file import load_params
from pipelines.presets import PRESETS, preset_overrides
from tests.helpers.params import REPO


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_gives_valid_params_and_a_model_for_its_source(name):
    params = load_params(REPO / "params.yaml", preset_overrides(name))
    side = params.data.image_size if params.data.source == "sprites" else (8, 8)
    config = params.model.to_config((1, *side))  # validates the model settings
    assert config.input_shape == (1, *side)
    for assignment in PRESETS[name].overrides:
        section, rest = assignment.split(".", 1)
        key = rest.split("=", 1)[0]
        assert hasattr(getattr(params, section), key), assignment


def test_set_wins_over_the_preset_and_unknown_presets_are_one_line(capsys, tmp_path):
    overrides = [*preset_overrides("digits-binary-iwae"), "model.mc_samples=7"]
    assert load_params(REPO / "params.yaml", overrides).model.mc_samples == 7
    code = main(["stage", "--preset", "nope", "--params", str(REPO / "params.yaml"), "--json"])
    assert code == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert error.startswith("unknown preset 'nope'; choose one of digits-binary-iwae")
