"""ensure_ray's retry of a Ray Client head that failed to start the client's server (Ray 2.60's
proxier, seen once in CI): which failures are tried again, how often, and within which deadline.
A fake ray.init stands in for Ray: what is tested is our decision, not Ray's client."""

from __future__ import annotations

import pytest

from pipelines.cluster import CLIENT_RETRIES, init_with_retry

# What ray.init raises then: the head's traceback, sent back in the init response.
FLAKE = ConnectionAbortedError(
    "Initialization failure from server:\nTraceback (most recent call last):\n"
    '  File "ray/util/client/server/proxier.py", line 772, in Datapath\n'
    "RuntimeError: Starting Ray client server failed. See ray_client_server_23001.err for "
    "detailed logs."
)


class FakeInit:
    """ray.init that raises the given errors in turn, then connects."""

    def __init__(self, *errors: BaseException):
        self.errors, self.calls = list(errors), []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        if self.errors:
            raise self.errors.pop(0)


def test_a_client_server_that_failed_to_start_is_tried_again_until_it_connects(capsys):
    init, slept = FakeInit(FLAKE, FLAKE), []
    init_with_retry(init, "ray://10.0.0.5:10001", {"log_to_driver": False}, slept.append)
    assert init.calls == [{"address": "ray://10.0.0.5:10001", "log_to_driver": False}] * 3
    assert slept == [2.0, 4.0]
    assert capsys.readouterr().err.count("could not start a server for this client") == 2


def test_the_retries_are_bounded_and_the_last_error_is_raised():
    init, slept = FakeInit(*[FLAKE] * (CLIENT_RETRIES + 2)), []
    with pytest.raises(ConnectionAbortedError, match="Starting Ray client server failed"):
        init_with_retry(init, "ray://10.0.0.5:10001", {}, slept.append)
    assert len(init.calls) == CLIENT_RETRIES + 1 == 3
    assert slept == [2.0, 4.0]


@pytest.mark.parametrize(
    ("address", "error"),
    [
        ("ray://10.0.0.5:10001", ConnectionError("ray client connection timeout")),
        ("ray://10.0.0.5:10001", RuntimeError("Version mismatch: the client has Python 3.11")),
        ("10.0.0.5:6379", FLAKE),  # not a Ray Client connection: no proxier involved
    ],
)
def test_any_other_failure_is_raised_at_once(address, error):
    init, slept = FakeInit(error), []
    with pytest.raises(type(error)):
        init_with_retry(init, address, {}, slept.append)
    assert len(init.calls) == 1 and slept == []


def test_no_retry_waits_past_the_network_deadline(monkeypatch):
    monkeypatch.setenv("VAE_PIPELINE_NETWORK_TIMEOUT_S", "3")  # room for the 2 s wait, not 4 s
    init, slept = FakeInit(FLAKE, FLAKE), []
    with pytest.raises(ConnectionAbortedError):
        init_with_retry(init, "ray://10.0.0.5:10001", {}, slept.append)
    assert len(init.calls) == 2 and slept == [2.0]
