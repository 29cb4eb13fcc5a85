"""While Ray Data runs, descriptor 2 is hidden (Ray's core worker writes an E line there for
every actor pool, ray-project/ray#57733) and Python's stderr still reaches the user."""

from __future__ import annotations

import logging
import os
import sys

from pipelines.cluster import VERBOSE_ENV, native_stderr_hidden


def test_native_lines_are_hidden_ours_show_and_a_handler_made_meanwhile_keeps_working(
    capfd, monkeypatch
):
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    with native_stderr_hidden():
        handler = logging.StreamHandler()  # takes sys.stderr as it is now
        print("ours inside", file=sys.stderr)
        os.write(2, b"native inside\n")
    handler.emit(logging.makeLogRecord({"msg": "handler after"}))
    os.write(2, b"native after\n")
    err = capfd.readouterr().err
    assert "ours inside" in err and "handler after" in err and "native after" in err, err
    assert "native inside" not in err and "Logging error" not in err, err


def test_with_verbose_nothing_is_hidden(capfd, monkeypatch):
    monkeypatch.setenv(VERBOSE_ENV, "1")
    with native_stderr_hidden():
        os.write(2, b"native inside\n")
    assert "native inside" in capfd.readouterr().err
