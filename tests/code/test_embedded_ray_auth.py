"""The Ray that `train` and `embed` start in-process when no cluster is named.

Ray 2.60's gRPC servers (GCS, raylet, workers) listen on every interface whatever node IP they
are given (Ray PRs #55484/#59852 bind them to the node IP in later releases), so what keeps
another machine out is Ray's token authentication, on by default for local clusters since 2.59.
This checks that the embedded Ray runs with it and refuses a client that lacks the token.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

_EMBEDDED = r"""
import sys
import ray
from ray._private.authentication.authentication_utils import is_token_auth_enabled
from pipelines.params_file import load_params
from pipelines.cluster import ensure_ray

ensure_ray(load_params("params.yaml", ["cluster.num_workers=1"]).cluster)
print(ray.get_runtime_context().gcs_address, is_token_auth_enabled(), flush=True)
sys.stdin.read()  # stay up until the test closes stdin
"""

_INTRUDER = r"""
import sys
import ray
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
    print("connected", ray.get(ray.put(1)))
except Exception as exc:
    print("refused", type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "")
"""


def test_embedded_ray_requires_its_token_and_refuses_a_client_without_it():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [sys.executable, "-c", _EMBEDDED], env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        gcs, auth = head.stdout.readline().split()
        assert auth == "True", "the embedded Ray runs without token authentication"
        # Another machine: it lacks this user's token file (~/.ray/auth_token) and brings a
        # token of its own (RAY_AUTH_TOKEN wins over the file).
        intruder = subprocess.run(
            [sys.executable, "-c", _INTRUDER, gcs],
            env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "x" * 32},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert intruder.stdout.startswith("refused"), intruder.stdout + intruder.stderr[-2000:]
        # The same client as this user on this machine, which reads the token file, gets in:
        # the refusal above was the token's doing, not a wrong address.
        owner = subprocess.run(
            [sys.executable, "-c", _INTRUDER, gcs], env={**env, "RAY_AUTH_MODE": "token"},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert owner.stdout.strip() == "connected 1", owner.stdout + owner.stderr[-2000:]
    finally:
        head.stdin.close()
        head.wait(60)
