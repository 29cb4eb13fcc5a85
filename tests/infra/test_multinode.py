"""Multi-node Ray on one machine: a head and a second node, each a `ray start --block` on
loopback with its own session, temp dir and side ports (built by the test infrastructure
`infra/testing/ray_nodes.py`).

A 2-worker training with one CPU per worker on two 1-CPU nodes must put one rank on each node,
checkpoint into a folder both nodes reach, and give exactly the numbers of a single-node run.
Every training runs in a subprocess through the CLI: a process can hold only one Ray
connection, and the pytest process may already hold one from other test modules.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.modules import load_module
from tests.infra.conftest import clean_env, history, train_cli

REPO = Path(__file__).resolve().parents[2]
RAY_NODES_PY = REPO / "infra" / "testing" / "ray_nodes.py"
RAY_WORKER_PORTS = range(10002, 20000)  # Ray keeps these for its workers


ray_nodes = load_module("infra_testing_ray_nodes", RAY_NODES_PY)


def _ray_port() -> int:
    while (port := ray_nodes.free_port("127.0.0.1")) in RAY_WORKER_PORTS:
        pass
    return port


def _stop(nodes, state: Path) -> None:
    """Joined node first (it drains through the head), then the head; SIGTERM to each
    `ray start --block` supervisor, SIGKILL to what is left only if it outlives the grace."""
    for node in reversed(nodes):
        ray_nodes.stop(node, state)


def _start_head(state: Path):
    """The head on a free port. A port found free can be taken before Ray binds it (any
    process's outgoing connection may get it from the same ephemeral range; seen once in CI
    as 'Address already in use'), so a head that fails to start gets two more tries on
    other ports."""
    for attempt in range(3):
        head = ray_nodes.ray_node(state, port=_ray_port(), num_cpus=1)
        try:
            ray_nodes.start(head, state)
            ray_nodes.wait_until_answering(head, state, timeout=90)
        except ray_nodes.StackError:
            _stop([head], state)
            if attempt == 2:
                raise
        else:
            return head
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head (1 CPU) and a second node (1 CPU) that joined it, both on 127.0.0.1."""
    state = tmp_path_factory.mktemp("multinode-state")  # long: temp dirs move to /tmp
    head = _start_head(state)
    node = ray_nodes.ray_node(state, join=head.url, num_cpus=1, name="ray-node1")
    started = [head]
    try:
        started.append(node)  # the node can join only a head that answers
        ray_nodes.start(node, state)
        ray_nodes.wait_until_answering(node, state, timeout=90)
        env = clean_env(RAY_ADDRESS=head.url, **ray_nodes.ray_client_env(state / "ray_auth_token"))
        yield {"address": head.url, "env": env, "nodes": _alive_nodes(env, expect=2)}
    finally:
        _stop(started, state)


_ALIVE_NODES = """
import json, time, ray
ray.init(log_to_driver=False)
deadline = time.monotonic() + 60
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= {expect} or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps({{n["NodeID"]: n["Resources"] for n in alive}}))
"""


def _alive_nodes(env: dict[str, str], expect: int) -> dict[str, dict]:
    """Node id -> resources of every alive node, as a driver of the cluster sees them."""
    out = subprocess.run(
        [sys.executable, "-c", _ALIVE_NODES.format(expect=expect)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.slow
def test_second_node_joins_the_head_with_one_cpu_each(two_nodes):
    nodes = two_nodes["nodes"]
    assert len(nodes) == 2
    assert sorted(res.get("CPU") for res in nodes.values()) == [1.0, 1.0]
    assert sum("node:__internal_head__" in res for res in nodes.values()) == 1


@pytest.mark.slow
def test_two_worker_training_spans_both_nodes_and_matches_a_single_node_run(
    two_nodes, infra_shards, embedded_reference, tmp_path
):
    multi = train_cli(
        tmp_path / "multi", infra_shards, two_nodes["env"],
        f"cluster.address={two_nodes['address']}",
    )  # fmt: skip
    single = embedded_reference  # Ray started in-process by the CLI

    # One rank on each node of the cluster, recorded in the result and in MLflow.
    assert len(multi["worker_nodes"]) == 2
    assert set(multi["worker_nodes"]) == set(two_nodes["nodes"])
    from mlflow import MlflowClient

    run = MlflowClient(multi["tracking_uri"]).get_run(multi["mlflow_run_id"])
    assert run.data.tags["ray.worker_nodes"] == ",".join(multi["worker_nodes"])
    assert run.info.status == "FINISHED"
    assert len(single["worker_nodes"]) == 2 and len(set(single["worker_nodes"])) == 1

    # Checkpoints went to the shared folder, whichever node wrote them.
    runs = tmp_path / "multi" / "runs" / multi["run_name"]
    assert Path(multi["checkpoint"]).is_relative_to(runs)
    # The best and the latest (one folder when the last epoch is the best).
    kept = {f"checkpoint_epoch_{multi['best_epoch']:05d}", "checkpoint_epoch_00001"}
    assert sorted(p.name for p in runs.glob("checkpoint_epoch_*")) == sorted(kept)

    # Same seed, data and world size: the same numbers, bit for bit.
    assert multi["epochs_run"] == single["epochs_run"] == 2
    multi_hist, single_hist = history(multi), history(single)
    assert [h["val_neg_elbo"] for h in multi_hist] == [h["val_neg_elbo"] for h in single_hist]
    assert [h["train_loss"] for h in multi_hist] == [h["train_loss"] for h in single_hist]
    assert multi["best_val_neg_elbo"] == single["best_val_neg_elbo"]
