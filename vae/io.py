"""Save and load models as safetensors weights plus a JSON config: no pickle anywhere.

Writes go to a temporary folder that is renamed into place, so a crash mid-write never leaves a
half-written model where a good one was.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vae.config import ModelConfig
from vae.errors import StorageError, VAEError
from vae.folders import swap_dir
from vae.model import Autoencoder, build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


METADATA = "metadata.json"
MODEL_FILES = frozenset({WEIGHTS, CONFIG, METADATA})


def check_model_dir_replaceable(directory: Path) -> None:
    """Only a folder holding a saved model (and nothing else) may be replaced by another."""
    if not directory.exists() and not directory.is_symlink():
        return
    foreign = None
    if directory.is_symlink() or not directory.is_dir():
        foreign = directory
    else:
        foreign = next((p for p in sorted(directory.iterdir()) if p.name not in MODEL_FILES), None)
        if foreign is None and any(directory.iterdir()) and not _our_config(directory / CONFIG):
            # Same file names, someone else's model (a Hugging Face folder has config.json and
            # model.safetensors too): ours only when its config.json is one of our configs.
            foreign = directory / CONFIG
    if foreign is not None:
        raise StorageError(
            errno.EEXIST,
            f"{directory} exists and is not a model vae-pipeline saved ({foreign} is not one of "
            "its files, or not one of ours); it would be replaced: choose another folder, or "
            "remove it",
        )


def _our_config(path: Path) -> bool:
    try:
        ModelConfig.from_json(path.read_text())
    except (OSError, ValueError, TypeError, AttributeError, VAEError):
        return False
    return True


def save_model(model: Autoencoder, directory: str | Path, extra: dict | None = None) -> Path:
    """Write `model.safetensors` and `config.json` (plus optional metadata) atomically.

    An existing folder is replaced only if it holds a saved model and nothing else."""
    directory = Path(directory)
    check_model_dir_replaceable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(model.config.to_json())
        if extra:
            (tmp / METADATA).write_text(json.dumps(extra, indent=2, sort_keys=True))
        swap_dir(tmp, directory)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        # safetensors reports I/O failures as its own type, "... (os error 28)": keep the errno.
        found = re.search(r"os error (\d+)", str(exc))
        code = getattr(exc, "errno", None) or (int(found[1]) if found else errno.EIO)
        raise StorageError(
            code,
            f"cannot write model to {directory} ({os.strerror(code)}); free space or fix "
            "permissions there and retry: the previous model, if any, is unchanged",
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_model(directory: str | Path, map_location: str = "cpu") -> Autoencoder:
    directory = Path(directory)
    if not (directory / WEIGHTS).is_file() or not (directory / CONFIG).is_file():
        raise VAEError(
            f"no saved model in {directory} (need {WEIGHTS} and {CONFIG}); "
            "train first or point at a model folder"
        )
    config = ModelConfig.from_json((directory / CONFIG).read_text())
    model = build_model(config)
    try:
        state = load_file(str(directory / WEIGHTS), device=map_location)
    except (SafetensorError, OSError) as exc:
        raise VAEError(
            f"model weights {directory / WEIGHTS} are unreadable ({exc}); re-train"
        ) from exc
    model.load_state_dict(state)
    model.eval()
    return model
