"""Multi-host mode without the privileges it needs says so in one line, before creating
anything."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers.modules import load_module

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("hosts", sys.argv[1])
hosts = importlib.util.module_from_spec(spec)
sys.modules["hosts"] = hosts
spec.loader.exec_module(hosts)
try:
    hosts.check_privileges()
except hosts.HostsError as exc:
    print(exc)
    sys.exit(2)
"""


def test_without_root_multi_host_mode_fails_in_one_line_naming_what_is_needed():
    """As user nobody, with the system's Python (the module uses only the standard library)."""
    import os
    import tempfile

    runuser, python = shutil.which("runuser"), shutil.which("python3", path="/usr/bin:/bin")
    assert runuser and python, "util-linux 'runuser' and /usr/bin/python3 are needed"
    folder = Path(tempfile.mkdtemp(prefix="vae-hosts-probe-"))
    try:
        os.chmod(folder, 0o755)
        module = folder / "hosts.py"
        shutil.copy(REPO / "infra" / "testing" / "netns_hosts.py", module)
        os.chmod(module, 0o644)
        out = subprocess.run(
            [runuser, "-u", "nobody", "--", python, "-c", _PROBE, str(module)],
            capture_output=True, text=True, timeout=60, check=False, cwd=folder,
        )  # fmt: skip
    finally:
        shutil.rmtree(folder)
    assert out.returncode == 2, out.stderr
    message = out.stdout.strip()
    assert "\n" not in message and "needs root" in message, message


def test_a_missing_ip_command_is_named(monkeypatch):
    hosts = load_module("hosts_probe", REPO / "infra/testing/netns_hosts.py", fresh=True)
    monkeypatch.setattr(hosts.shutil, "which", lambda name: None)
    with pytest.raises(hosts.HostsError, match="needs iproute2's 'ip' command"):
        hosts.check_privileges()
