"""How the `vae-pipeline` process behaves around a command, whatever the command: exit codes,
SIGTERM as an exception, stdout kept for the one JSON document, a crash log for bugs, one line
for OS errors, and library chatter kept out of the way. The command table is cli.py.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from pipelines.errors import Interrupted

EXIT_USER_ERROR = 2
EXIT_BUG = 1  # an unexpected error: a bug report line with the log path


def interrupted_line(signal_name: str, command: str) -> str:
    """What to do after an interrupt, for the command that was cut off."""
    again = {
        "train": "re-run the same command: train resumes from its latest checkpoint",
        "retrain": "re-run the same command: its training resumes from its latest checkpoint",
        "sweep": "re-run the same command: finished trials are reused, the others resume from "
        "their latest checkpoints",
    }.get(command, "re-run the same command")
    return f"interrupted by {signal_name}; nothing half-written was kept: {again}"


def crash_log(exc: BaseException) -> Path | None:
    """The traceback of an unexpected error, for a bug report; None if it cannot be written."""
    folder = Path(tempfile.gettempdir()) / "vae-pipeline-logs"
    path = folder / f"crash-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(exc)))
    except OSError:
        return None
    return path


def os_error_line(exc: OSError) -> str:
    """One line for an OSError that reached the edge. Without a file name (a full disk hit
    mid-write often has none) it names the folders the command writes, so the user knows
    where to make room."""
    what = (exc.strerror or type(exc).__name__).lower()
    if exc.filename is not None:
        return f"{what}: {exc.filename}; check the path, its permissions and free space, and re-run"
    if isinstance(exc, ConnectionError | TimeoutError):  # a network failure, not a file's
        return f"a network connection failed ({what}); check the addresses in params and the environment, and re-run (--verbose shows more)"
    where = f"the working folder {Path.cwd()} or the temporary folder {tempfile.gettempdir()}"
    return f"{what} while writing under {where}; free space or fix permissions there, and re-run"


def quiet_libraries(verbose: bool) -> None:
    """What the libraries print is theirs to log, ours to show: MLflow's INFO lines (database
    set-up) and the "View run ... at: http://..." lines it prints when a run ends against a
    tracking server stay out of the way unless --verbose, and the temporary Prefect server's
    telemetry, which offline logs an ERROR every run, is off unless a user turns it on."""
    import logging

    from pipelines.cluster import VERBOSE_ENV

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Our stages draw their own bars; MLflow's per-download bars (four per register) are noise.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    # An environment variable, not a logger level: MLflow sets its level when first imported,
    # which for most commands is after this (and in Ray workers, which inherit it).
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Those "View run" lines are a print to stdout, not a log record: only this switch stops
    # them (the command's own summary says where to look). In the environment, so that served
    # flow runs inherit it.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def quiet_prefect() -> None:
    """Prefect's per-task "Finished in state Completed()" and temporary-server lines hidden; the
    flow's own lines (what was staged, trained, promoted) stay. After Prefect is imported: it
    configures its loggers then."""
    import logging

    from pipelines.cluster import verbose

    if verbose():
        return
    logging.getLogger("prefect").setLevel(logging.WARNING)
    logging.getLogger("prefect.flow_runs").setLevel(logging.INFO)


def on_sigterm(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def stdout_kept_for_the_result(as_json: bool) -> Iterator[None]:
    """With --json, stdout carries exactly one JSON document: whatever else reaches it while the
    command runs (Ray workers' lines forwarded to the driver, a library's print) goes to stderr,
    at the descriptor (child processes) and at Python's sys.stdout (threads)."""
    if not as_json:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)
