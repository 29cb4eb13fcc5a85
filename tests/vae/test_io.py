"""Weights save and load without pickle, atomically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vae import ModelConfig, StorageError, VAEError, build_model, load_model, save_model


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
    with pytest.raises(StorageError, match="No space left on device"):
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


_FULL_DISK = r"""
import errno, json, os, subprocess, sys
from pathlib import Path
import torch
from pathlib import Path
from vae import ModelConfig, StorageError, build_model, load_model, save_model

disk = Path(sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
small = build_model(ModelConfig(hidden=(32,), latent_dim=2), seed=0).eval()
save_model(small, disk / "m")  # about 20 kB: fits
big = build_model(ModelConfig(hidden=(2048, 1024), latent_dim=2), seed=1)  # about 9 MB: not
try:
    save_model(big, disk / "m")
    error = None
except StorageError as exc:  # an OSError too, with the errno of the failed write
    error = exc.errno
x = torch.rand(4, 64)
again = load_model(disk / "m")
print(json.dumps({
    "errno": error,
    "same_outputs": bool(torch.equal(small.embed(x)[0], again.embed(x)[0])),
    "entries": sorted(p.name for p in disk.iterdir()),
}))
"""


def test_a_really_full_disk_keeps_the_previous_model_whole(tmp_path):
    """A 1 MiB tmpfs in a private mount namespace (no root needed where user namespaces are
    allowed): the second save hits ENOSPC, and the first model still loads, unchanged."""
    from tests.helpers.mounts import in_mount_namespace

    disk = tmp_path / "disk"
    disk.mkdir()
    result = in_mount_namespace(_FULL_DISK, str(disk), timeout=120)
    assert result["errno"] == 28  # ENOSPC: the disk really was full
    assert result["same_outputs"]
    assert result["entries"] == ["m"], "no half-written or temporary folder left behind"


@pytest.mark.parametrize("foreign", ["notes.txt", "sub/deeper.bin"])
def test_save_never_replaces_a_folder_that_is_not_a_saved_model(tmp_path, foreign):
    target = tmp_path / "out"
    (target / foreign).parent.mkdir(parents=True)
    (target / foreign).write_text("mine")
    model = build_model(ModelConfig(input_shape=(4,), hidden=(8,), latent_dim=2), seed=0)
    with pytest.raises(StorageError, match="is not a model vae-pipeline saved"):
        save_model(model, target)
    assert (target / foreign).read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_save_never_replaces_someone_elses_model_with_the_same_file_names(tmp_path):
    """A Hugging Face folder holds config.json and model.safetensors too: the names match, the
    config is not ours, so it stays; a folder this library saved is replaced."""
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text('{"architectures": ["BertModel"], "hidden_size": 768}')
    (target / "model.safetensors").write_bytes(b"their weights")
    model = build_model(ModelConfig(input_shape=(4,), hidden=(8,), latent_dim=2), seed=0)
    with pytest.raises(StorageError, match="config.json is not one of its files, or not one of"):
        save_model(model, target)
    assert (target / "model.safetensors").read_bytes() == b"their weights"
    ours = tmp_path / "ours"
    save_model(model, ours)
    save_model(model, ours)  # our own model: replaced
    assert (ours / "config.json").is_file()


def test_swap_dir_replaces_whole_and_puts_the_old_folder_back_when_the_swap_fails(
    tmp_path, monkeypatch
):
    import os

    from vae.folders import swap_dir

    target, new = tmp_path / "t", tmp_path / "new"
    target.mkdir()
    (target / "a").write_text("old")
    new.mkdir()
    (new / "b").write_text("new")
    real_replace = os.replace

    def fail_second(src, dst):
        if Path(src) == new:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError):
        swap_dir(new, target)
    assert (target / "a").read_text() == "old"
    monkeypatch.setattr(os, "replace", real_replace)
    swap_dir(new, target)
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"], "nothing left aside"


@pytest.mark.parametrize("left", ["folder", "file", "link-to-someones-folder"])
def test_swap_dir_clears_what_a_killed_swap_left_aside_but_never_follows_a_link(tmp_path, left):
    from vae.folders import swap_dir

    target, new, aside = tmp_path / "t", tmp_path / "new", tmp_path / ".t.old"
    for folder, name in ((target, "a"), (new, "b")):
        folder.mkdir()
        (folder / name).write_text(name)
    someones = tmp_path / "someones"
    someones.mkdir()
    (someones / "keep").write_text("theirs")
    if left == "folder":
        aside.mkdir()
        (aside / "stale").write_text("x")
    elif left == "file":
        aside.write_text("stale")
    else:
        aside.symlink_to(someones)
    swap_dir(new, target)
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert not aside.exists() and not aside.is_symlink()
    assert (someones / "keep").read_text() == "theirs"  # the link went, not what it named


@pytest.mark.parametrize("missing", ["model.safetensors", "config.json"])
def test_a_model_folder_missing_either_file_is_refused_naming_both(tmp_path, missing):
    from vae import ModelConfig, VAEError, build_model, load_model, save_model

    save_model(
        build_model(ModelConfig(input_shape=(6,), latent_dim=2, hidden=(4,))), tmp_path / "m"
    )
    (tmp_path / "m" / missing).unlink()
    with pytest.raises(
        VAEError, match=r"^no saved model in .* \(need model.safetensors and config"
    ):
        load_model(tmp_path / "m")


def _small():
    return build_model(ModelConfig(input_shape=(6,), latent_dim=2, hidden=(4,)), seed=0)


def test_a_model_saves_into_a_new_nested_folder_with_its_metadata(tmp_path):
    import json

    extra = {"run": "vae-1", "epoch": 3, "a": [1, 2]}
    save_model(_small(), tmp_path / "new" / "deeper" / "m", extra=extra)
    folder = tmp_path / "new" / "deeper" / "m"
    assert json.loads((folder / "metadata.json").read_text()) == extra
    assert load_model(folder).config.latent_dim == 2


def test_a_model_is_written_in_a_hidden_folder_beside_the_target_then_swapped_in(
    tmp_path, monkeypatch
):
    from vae import io

    seen = []
    real = io.save_file
    monkeypatch.setattr(
        io, "save_file", lambda state, path: seen.append(Path(path)) or real(state, path)
    )
    save_model(_small(), tmp_path / "m")
    (written,) = seen
    assert written.parent.parent == tmp_path and written.parent.name.startswith(".m.")
    assert not written.parent.exists() and (tmp_path / "m" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("error", "code"),
    [
        ("safetensors", 28),  # safetensors' own error type, "(os error 28)" in its text
        (OSError(13, "Permission denied"), 13),
        (RuntimeError("no errno anywhere"), None),
    ],
)
def test_a_failed_write_is_one_storage_error_with_the_errno_and_no_temp_folder(
    tmp_path, monkeypatch, error, code
):
    import errno as errnos
    import os

    from safetensors import SafetensorError

    from vae import io

    if error == "safetensors":
        error = SafetensorError("Error while serializing: IoError(No space left (os error 28))")
    elif isinstance(error, RuntimeError):
        error = OSError("no errno anywhere")  # an OSError that carries no errno
    code = code or errnos.EIO

    def fail(state, path):
        raise error

    monkeypatch.setattr(io, "save_file", fail)
    with pytest.raises(StorageError) as e:
        save_model(_small(), tmp_path / "m")
    assert e.value.errno == code
    assert str(e.value) == (
        f"cannot write model to {tmp_path / 'm'} ({os.strerror(code)}); free space or fix "
        "permissions there and retry: the previous model, if any, is unchanged"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_save_leaves_no_temp_folder_and_stays_an_interrupt(tmp_path, monkeypatch):
    from vae import io

    def interrupted(state, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_model(_small(), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("what", ["a file", "a link to a saved model"])
def test_a_path_that_is_not_a_model_folder_is_never_replaced(tmp_path, what):
    import errno as errnos

    target = tmp_path / "m"
    if what == "a file":
        target.write_text("notes")
    else:
        save_model(_small(), tmp_path / "real")
        target.symlink_to(tmp_path / "real")
    with pytest.raises(StorageError) as e:
        save_model(_small(), target)
    assert e.value.errno == errnos.EEXIST
    assert str(e.value).startswith(
        f"{target} exists and is not a model vae-pipeline saved ({target} is not"
    )
    assert str(e.value).endswith("it would be replaced: choose another folder, or remove it")
    assert target.is_symlink() or target.read_text() == "notes"


def test_loading_from_an_empty_folder_says_to_train_first(tmp_path):
    with pytest.raises(VAEError, match=r"; train first or point at a model folder$"):
        load_model(tmp_path)


def test_evaluation_results_as_a_dict_name_their_units_and_drop_the_per_example_scores():
    from vae import evaluate

    model = _small()
    d = evaluate(model, torch.rand(4, 6), iw_k=0).to_dict()
    assert d["units"] == "nats per example"
    assert "per_example_neg_elbo" not in d and d["n_examples"] == 4
