"""Real read-only folders and really full disks, without root: a script runs as root of a
private user and mount namespace (`unshare --mount --map-root-user`), so the mounts it makes
are seen by it alone and vanish with it. Root ignores permission bits; a read-only mount it
does not."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path


def in_mount_namespace(script: str, *args: str, timeout: float, cwd: Path | None = None) -> dict:
    """`python -c script *args` in a private mount namespace; the JSON of its last stdout line."""
    assert shutil.which("unshare"), "util-linux 'unshare' is needed for this test"
    out = subprocess.run(
        ["unshare", "--mount", "--map-root-user", sys.executable, "-c", script, *args],
        capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# argv: the folder to make read-only, the params file, {case: CLI argv}. Runs every case in
# this one process, then lists the folder: {case: {"code", "err"}, "entries": [...]}.
_CLI_ON_READ_ONLY = textwrap.dedent(
    r"""
    import contextlib, io, json, os, subprocess, sys

    ro, params, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    subprocess.run(["mount", "--bind", ro, ro], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", ro], check=True)
    from pipelines.cli import main

    results = {}
    for name, argv in cases.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main([*argv, "--params", params, "--quiet"])
        results[name] = {"code": code, "err": err.getvalue().strip()}
    results["entries"] = sorted(os.listdir(ro))
    print(json.dumps(results))
    """
)


def cli_on_read_only(
    ro: Path, params_file: Path, cases: dict[str, list[str]], timeout: float = 300
) -> dict:
    """Each case's `vae-pipeline` argv (with --params params_file --quiet), run in one process
    after ro became a read-only bind mount of itself: {case: {"code": exit code, "err": its
    stderr}, "entries": what ro holds afterwards}."""
    return in_mount_namespace(
        _CLI_ON_READ_ONLY, str(ro), str(params_file), json.dumps(cases), timeout=timeout
    )
