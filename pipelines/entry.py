"""The `vae-pipeline` console script's first and last lines: signal handlers before any heavy
import, and leaving Ray (and the heap) once the result is out.

Importing the CLI pulls in torch, pydantic and more (about a second). A Ctrl-C or SIGTERM in
that second would otherwise end in a KeyboardInterrupt traceback or a silent exit 143; here it
is the same one line (and JSON document) as later on, with nothing written yet.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys


def _early(signum: int, frame: object) -> None:
    name = signal.Signals(signum).name
    line = f"interrupted by {name} while starting; nothing was written: re-run the same command"
    sys.stderr.write(f"error: {line}\n")
    if "--json" in sys.argv:
        doc = {"error": line, "signal": name, "exit_code": 128 + signum}
        sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)  # nothing to clean up yet; no interpreter teardown mid-import


def main() -> int:
    # An ignored SIGINT (a background job of a non-interactive shell, nohup) stays ignored.
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _early)
    signal.signal(signal.SIGTERM, _early)
    from pipelines.cli import main as cli_main  # the CLI puts its own handlers in place

    code = cli_main()
    _leave_ray(verbose="--verbose" in sys.argv[1:])
    # The result is out and every file closed. Without this, the interpreter's exit walks the
    # whole heap of torch, MLflow and Ray objects for a last garbage collection: 0.7 s of
    # every command's wall time. Exit hooks still run; only that walk is skipped.
    gc.freeze()
    return code


def _leave_ray(verbose: bool) -> None:
    """Disconnect from Ray once the result is out. Left to the interpreter's exit, Ray's own
    hook first sleeps 0.5 s so that workers' log lines finish printing: only --verbose prints
    them (they go to a file otherwise), so only --verbose keeps that wait."""
    ray = sys.modules.get("ray")
    if verbose or ray is None or not ray.is_initialized():
        return
    try:
        ray.shutdown()
    except Exception:  # noqa: BLE001 - the result is already out; the exit hook tries again
        pass


if __name__ == "__main__":
    sys.exit(main())
