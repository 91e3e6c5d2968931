"""Faults of a deployment, as `fedit` processes on 127.0.0.1 (TLS and node auth on):

- an owner whose machine goes down mid-round (SIGKILL once its task arrived) does not stop
  the run: the round aggregates the owners that answered and metrics.jsonl names who
  dropped; a node whose key is not on the roster is refused and `fedit join` says so;
- the coordinator killed mid-run (SIGKILL: no chance to stop its SuperLink) and started
  again with `--resume` continues from its last completed round, SCAFFOLD's server control
  variate restored and each owner's c_k taken from its own disk, and ends with the global
  adapter of the uninterrupted simulation, bit for bit.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedit.config import load_config
from fedit.engine.simulation import Simulation
from tests.deploy.conftest import Children, Deployment, Pki, log_tails

pytestmark = pytest.mark.deploy  # real processes on 127.0.0.1: -m 'not deploy' skips them


@pytest.fixture
def children():
    """Per test, not per module: each test's federation is gone before the next starts."""
    kids = Children()
    try:
        yield kids
    finally:
        kids.close()


def test_a_crashed_owner_is_dropped_and_an_unknown_node_refused(
    pki: Pki, children: Children, tiny_model_dir: Path, tmp_path: Path
) -> None:
    deployment = Deployment(children, pki, tmp_path, tiny_model_dir, "fedavg")
    coordinator = deployment.coordinator(round_timeout=20, min_replies=2)
    deployment.owner(0)
    deployment.owner(1)
    crashing = deployment.owner(2, FEDIT_TEST_CRASH_AT_ROUND="2")
    intruder_key, _ = pki.node(f"{tmp_path.name}-intruder")
    intruder = deployment.owner(0, "--activation-wait", "10", key=intruder_key, name="intruder")

    assert deployment.wait_exit(intruder) == 2  # fedit's exit code for a reported error
    said = intruder.log_text()
    assert "not registered" in said or "refused" in said, said[-2000:]
    assert deployment.wait_exit(coordinator) == 0, coordinator.log_text()[-3000:]
    assert crashing.exit_code() == -signal.SIGKILL

    first, second = (line for line in deployment.metrics() if line["round"] >= 1)
    assert [c["id"] for c in first["clients"]] == [0, 1, 2]
    assert [c["id"] for c in second["clients"]] == [0, 1]
    assert second["dropped"] == [{"client": 2, "reason": "timeout"}]
    assert (deployment.out / "round_0002" / "adapter_model.safetensors").is_file()
    leftover = tmp_path / "state_2" / "node" / "supernode.pid"
    if leftover.is_file():  # the crashed owner's SuperNode lives on, as on a real machine
        os.killpg(int(leftover.read_text()), signal.SIGKILL)


def test_a_killed_coordinator_resumes_to_the_uninterrupted_result(
    pki: Pki, children: Children, tiny_model_dir: Path, tmp_path: Path
) -> None:
    deployment = Deployment(
        children, pki, tmp_path, tiny_model_dir, "scaffold", **{"federation.rounds": 3}
    )
    simulated = tmp_path / "simulated"
    Simulation(load_config(None, deployment.overrides(simulated)), show_progress=False).run()

    coordinator = deployment.coordinator()
    owners = [deployment.owner(k) for k in range(3)]
    first_round = deployment.out / "round_0001"
    deadline = time.monotonic() + 600  # a guard against a hang, not a timing check
    while not first_round.is_dir():
        running = time.monotonic() < deadline and coordinator.exit_code() is None
        assert running, log_tails([coordinator, *owners])
        time.sleep(0.2)
    coordinator.proc.kill()  # the process only: its SuperLink child is left running
    coordinator.proc.wait()
    assert not (deployment.out / "round_0003").exists()

    resumed = deployment.coordinator("--resume")
    assert deployment.wait_exit(resumed) == 0, resumed.log_text()[-3000:]
    for n in range(1, 4):
        name = f"round_{n:04d}/adapter_model.safetensors"
        sim, dep = load_file(simulated / name), load_file(deployment.out / name)
        for key in sim:
            assert torch.equal(sim[key], dep[key]), (n, key)
    assert [line["round"] for line in deployment.metrics()] == [0, 1, 2, 3]
    for owner in owners:
        assert owner.exit_code() is None  # they waited through the outage
        assert "base model loads: 2" not in owner.log_text()
