"""fedit across processes: `fedit coordinate` and three `fedit join` on 127.0.0.1, TLS and
node authentication on, the tiny model; against the same config run as a simulation.

One federation per strategy (FedAvg, SCAFFOLD: the one whose client state lives on the
owners) checks, after it completes:
- parity: the global adapter after every round equals the simulation's, bit for bit;
- the message audit: every reply an owner sent holds only the adapter (float32, the
  adapter's own names and shapes), SCAFFOLD's control delta, the two counts, scalar
  metrics and a status, and no string from the owner's records;
- residency: each owner loaded the base model once for the whole run;
- the run directory holds what a simulation's holds, plus traffic per client and round.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedit.config import load_config
from fedit.data.readers import read_records
from fedit.engine.simulation import Simulation
from tests.deploy.conftest import ROUNDS, Children, Deployment, Pki

pytestmark = pytest.mark.deploy  # real processes on 127.0.0.1: -m 'not deploy' skips them

REPLY_RECORDS = {"update", "counts", "metrics", "status"}


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold"])
def test_a_deployment_trains_what_the_simulation_trains(
    strategy: str, pki: Pki, children: Children, tiny_model_dir: Path, tmp_path: Path
) -> None:
    deployment = Deployment(children, pki, tmp_path, tiny_model_dir, strategy)
    simulated = tmp_path / "simulated"
    Simulation(load_config(None, deployment.overrides(simulated)), show_progress=False).run()

    coordinator = deployment.coordinator()  # owners may start first; here they wait
    owners = [deployment.owner(k) for k in range(3)]
    assert deployment.wait_exit(coordinator) == 0, coordinator.log_text()[-3000:]
    deployed, files = deployment.out, deployment.files

    for n in range(1, ROUNDS + 1):
        sim = load_file(simulated / f"round_{n:04d}" / "adapter_model.safetensors")
        dep = load_file(deployed / f"round_{n:04d}" / "adapter_model.safetensors")
        assert sim.keys() == dep.keys()
        for name in sim:
            assert torch.equal(sim[name], dep[name]), (n, name)

    lines = [json.loads(x) for x in (deployed / "metrics.jsonl").read_text().splitlines()]
    trained = [line for line in lines if line["round"] >= 1]
    assert [line["round"] for line in trained] == list(range(1, ROUNDS + 1))
    for line in trained:
        assert [c["id"] for c in line["clients"]] == [0, 1, 2]
        assert all(c["bytes_down"] > 0 and c["bytes_up"] > 0 for c in line["clients"])
        assert "heldout" in line or line["round"] < ROUNDS

    shapes = {
        k: list(v.shape)
        for k, v in load_file(deployed / "round_0001" / "adapter_model.safetensors").items()
    }
    for k, owner in enumerate(owners):
        audit, log = tmp_path / f"audit_{k}.jsonl", owner.log_path
        texts = {r.response for r in read_records(str(files[k]))}
        texts |= {r.instruction for r in read_records(str(files[k]))}
        replies = [json.loads(x) for x in audit.read_text().splitlines()]
        assert len(replies) >= ROUNDS
        for reply in replies:
            check_reply(reply, strategy, len(shapes), texts)
        assert "base model loads: 1" in log.read_text()
        assert "base model loads: 2" not in log.read_text()
        owner.stop()


def check_reply(reply: dict, strategy: str, num_tensors: int, texts: set[str]) -> None:
    """Only adapter tensors, counts, scalar metrics and a fixed status leave an owner."""
    records = reply["records"]
    extras = {"control_delta"} if strategy == "scaffold" else set()
    assert set(records) in (REPLY_RECORDS | extras, {"status"}), set(records)
    for name, record in records.items():
        if record["type"] == "arrays":
            assert name in {"update", *extras}
            assert len(record["arrays"]) == num_tensors
            for dtype, _shape, stype in record["arrays"].values():
                assert (dtype, stype) == ("float32", "numpy.ndarray")
        elif record["type"] == "metrics":
            assert all(isinstance(v, int | float) for v in record["items"].values())
        else:
            assert record["type"] == "config" and name == "status"
            for value in record["items"].values():
                assert not any(t and t in str(value) for t in texts)
