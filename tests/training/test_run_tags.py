"""The MLflow run of a training says which DVC experiment ran it."""

from __future__ import annotations

from pipelines.training import driver


def test_a_run_under_dvc_exp_run_is_tagged_with_the_experiments_name(monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-beta")
    assert driver._experiment_tag() == {"dvc.experiment": "lucky-beta"}


def test_a_run_outside_an_experiment_has_no_experiment_tag(monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert driver._experiment_tag() == {}
    monkeypatch.setenv("DVC_EXP_NAME", "")
    assert driver._experiment_tag() == {}
