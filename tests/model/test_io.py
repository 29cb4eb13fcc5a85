"""Weights save and load without pickle, atomically."""

from __future__ import annotations

import pytest
import torch

from vae import ModelConfig, VAEError, build_model, load_model, save_model


def test_saved_model_loads_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="conv", input_shape=(1, 8, 8), latent_dim=3)).eval()
    save_model(model, tmp_path / "m", extra={"epoch": 3})
    loaded = load_model(tmp_path / "m")
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(model.embed(x)[0], loaded.embed(x)[0])
    assert loaded.config == model.config
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "metadata.json",
        "model.safetensors",
    ]


def test_weights_file_is_safetensors_not_pickle(tmp_path):
    save_model(build_model(ModelConfig()), tmp_path / "m")
    head = (tmp_path / "m" / "model.safetensors").read_bytes()[:16]
    assert not head.startswith(b"\x80"), "pickle protocol header found"
    assert b"PK" not in head[:4], "torch zip/pickle archive found"


def test_overwriting_a_model_replaces_it_whole_and_leaves_no_temp_folders(tmp_path):
    save_model(build_model(ModelConfig(latent_dim=2)), tmp_path / "m")
    save_model(build_model(ModelConfig(latent_dim=5)), tmp_path / "m")
    assert load_model(tmp_path / "m").config.latent_dim == 5
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_a_failed_save_keeps_the_previous_model(tmp_path, monkeypatch):
    save_model(build_model(ModelConfig(latent_dim=2)), tmp_path / "m")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("vae.io.save_file", disk_full)
    with pytest.raises(OSError):
        save_model(build_model(ModelConfig(latent_dim=5)), tmp_path / "m")
    assert load_model(tmp_path / "m").config.latent_dim == 2
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_loading_a_missing_or_corrupt_model_says_what_to_do(tmp_path):
    with pytest.raises(VAEError, match="no saved model"):
        load_model(tmp_path / "nothing")
    save_model(build_model(ModelConfig()), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(VAEError, match="unreadable"):
        load_model(tmp_path / "m")
