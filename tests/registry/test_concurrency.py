"""Two registrations at once, as two processes against a real MLflow server, made to reach
the registration lock at the same moment."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pytest

from pipelines.registry import models as registry
from tests.helpers.params import REGISTRY, overrides_in, set_args
from tests.registry.conftest import write_stage_outputs
from tests.servers import mlflow_server

pytestmark = pytest.mark.slow

# `vae-pipeline register ...` (argv[3:]) with one change: the call that takes the registration
# lock first waits until every process (argv[2]) has reached it, each leaving a file in the
# barrier folder (argv[1]). Both then gate, read the champion and write at the same moment
# unless the lock really keeps them apart. No hook in the code under test.
_REGISTER_AT_THE_SAME_MOMENT = r"""
import os, sys, time
from pathlib import Path
from pipelines import cli
from pipelines.registry import register

barrier, parties, real = Path(sys.argv[1]), int(sys.argv[2]), register.registration_lock

def registration_lock(params):
    (barrier / str(os.getpid())).touch()
    deadline = time.monotonic() + 180
    while len(list(barrier.iterdir())) < parties:
        if time.monotonic() > deadline:
            sys.exit("the other registration never reached the registration lock")
        time.sleep(0.005)
    return real(params)

register.registration_lock = registration_lock
sys.exit(cli.main(sys.argv[3:]))
"""


def test_two_concurrent_registrations_leave_exactly_one_consistent_champion_pair(
    tmp_path, small_params, staged_shards, models
):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    with mlflow_server(tmp_path / "server") as uri:
        # The same weights twice: whichever registers second ties (d = 0) and must not win.
        procs = []
        for label in ("a", "b"):
            sets = (f"mlflow.tracking_uri={uri}", f"outputs_dir=out-{label}")
            params = small_params(*sets, preset=REGISTRY, shards=staged_shards, own_root=True)
            write_stage_outputs(params, models["strong"], f"run-{label}")
            cmd = [sys.executable, "-c", _REGISTER_AT_THE_SAME_MOMENT, str(barrier), "2"]
            cmd += ["register", "--json", "--quiet", "--params", str(tmp_path / "params.yaml")]
            cmd += set_args(overrides_in(tmp_path, *REGISTRY, *sets, shards=staged_shards))
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        outs = [p.communicate(timeout=240) for p in procs]
        for p, (_, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err.decode()[-2000:]
        assert len(list(barrier.iterdir())) == 2, "both reached the lock together"
        results = [json.loads(out.decode()) for out, _ in outs]

        assert sorted(r["decision"] for r in results) == ["challenger", "champion"]
        winner = next(r for r in results if r["decision"] == "champion")
        loser = next(r for r in results if r["decision"] == "challenger")
        assert loser["previous_champion"] == winner["encoder_version"]
        client = mlflow.MlflowClient(uri)
        name = registry.model_name(params.registry.name, "encoder")
        champ = {r: registry.alias_version(client, registry.model_name(params.registry.name, r), "champion")
                 for r in registry.ROLES}  # fmt: skip
        assert champ == {"encoder": winner["encoder_version"], "decoder": winner["decoder_version"]}
        enc = client.get_model_version(name, champ["encoder"])
        assert enc.tags["vae.pair"] == winner["decoder_uri"]
        assert registry.alias_version(client, name, "challenger") == loser["encoder_version"]
