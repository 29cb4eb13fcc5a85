"""The console script leaves Ray itself once the result is out, skipping the half-second wait
Ray's exit hook keeps for workers' log lines, except under --verbose, which prints them; and it
spares the interpreter's exit a last walk over the heap."""

from __future__ import annotations

import sys
import types

import pytest

from pipelines import entry


class _Ray(types.SimpleNamespace):
    def __init__(self, initialized: bool) -> None:
        super().__init__(shutdowns=0, initialized=initialized)

    def is_initialized(self) -> bool:
        return self.initialized

    def shutdown(self) -> None:
        self.shutdowns += 1


@pytest.mark.parametrize(
    ("initialized", "verbose", "shutdowns"),
    [(True, False, 1), (True, True, 0), (False, False, 0)],
)
def test_the_console_script_leaves_ray_unless_verbose(monkeypatch, initialized, verbose, shutdowns):
    ray = _Ray(initialized)
    monkeypatch.setitem(sys.modules, "ray", ray)
    entry._leave_ray(verbose)
    assert ray.shutdowns == shutdowns


def test_a_failing_disconnect_leaves_the_exit_code_alone(monkeypatch):
    ray = _Ray(True)

    def broken() -> None:
        raise RuntimeError("raylet gone")

    ray.shutdown = broken
    monkeypatch.setitem(sys.modules, "ray", ray)
    entry._leave_ray(False)  # no exception: the result was already printed


def test_no_ray_imported_is_nothing_to_leave(monkeypatch):
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    entry._leave_ray(False)


def test_the_exit_skips_the_last_heap_walk_but_still_runs_exit_hooks():
    """entry.main freezes the heap once the result is out (the exit's garbage collection then
    has nothing to walk); exit hooks, which close logs and leave servers, still run."""
    import subprocess
    import textwrap

    code = textwrap.dedent(
        """
        import atexit, gc, sys
        import pipelines.cli
        pipelines.cli.main = lambda: 3
        atexit.register(lambda: print("hook ran, frozen:", gc.get_freeze_count() > 0))
        from pipelines import entry
        sys.exit(entry.main())
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.strip() == "hook ran, frozen: True"
