"""A file that is not in a package (a benchmark, an infra script) loaded as a module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def load_module(name: str, path: Path, *, fresh: bool = False):
    """The file at path as the module `name`, loaded once per process (fresh: run it again).
    Registered in sys.modules before it runs: a dataclass in it looks its module up there."""
    if fresh or name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]
