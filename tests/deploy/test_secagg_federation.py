"""Secure aggregation across processes: `fedit coordinate` and three `fedit join` on
127.0.0.1 (TLS and node authentication on, the tiny model), against the same config
simulated without it.

- What each owner uploaded (recorded as it left the owner, so exactly what the coordinator
  received) is masked: read as an update it is noise spread over all of Z_{2^bits},
  uncorrelated with the round's actual mean update.
- The global adapter equals the plain simulation's within the quantisation bound the run
  itself records (plus float32 rounding) after round 1, and within 1% of the last round's
  step at the end (training from adapters that differ slightly does not shrink the gap).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fedit.config import load_config
from fedit.deploy.coordinator import CoordinatorSide
from fedit.deploy.secagg import crypto
from fedit.engine.simulation import Simulation
from fedit.models.adapters import get_adapter_state
from tests.deploy.conftest import ROUNDS, Children, Deployment, Pki

pytestmark = pytest.mark.deploy
CLIP, BITS = 8.0, 32
EPS32 = torch.finfo(torch.float32).eps


def flat(path: Path) -> np.ndarray:
    state = load_file(path)
    return crypto.flatten(state, {k: tuple(v.shape) for k, v in state.items()})


def adapter(out: Path, n: int) -> np.ndarray:
    return flat(out / f"round_{n:04d}" / "adapter_model.safetensors")


def test_a_secure_deployment_uploads_masks_and_learns_the_simulations_mean(
    pki: Pki, children: Children, tiny_model_dir: Path, tmp_path: Path
) -> None:
    secure = {"secagg.bits": BITS, "secagg.clip_range": CLIP, "secagg.stage_timeout": 90.0}
    deployment = Deployment(children, pki, tmp_path, tiny_model_dir, "fedavg", **secure)
    simulated = tmp_path / "simulated"
    Simulation(load_config(None, deployment.overrides(simulated)), show_progress=False).run()

    deployment.extra["secagg.enabled"] = True  # the deployment only: a simulation refuses it
    coordinator = deployment.coordinator()
    owners = [deployment.owner(k, "--secure-aggregation-only") for k in range(3)]
    assert deployment.wait_exit(coordinator) == 0, coordinator.log_text()[-3000:]
    for owner in owners:
        owner.stop()

    lines = [line for line in deployment.metrics() if line["round"] >= 1]
    assert [line["round"] for line in lines] == list(range(1, ROUNDS + 1))
    for line in lines:
        assert [c["id"] for c in line["clients"]] == [0, 1, 2]
        assert all("num_examples" not in c for c in line["clients"])  # the weights stay hidden
        assert line["secure_aggregation"]["survivors"] == 3

    # round 1 trains from the same start in both: within the bound the run states
    start = flat(tiny_start(deployment))
    bound = lines[0]["secure_aggregation"]["quantisation_error_bound"]
    sim1, dep1 = adapter(simulated, 1), adapter(deployment.out, 1)
    rounding = 4 * EPS32 * (np.abs(sim1) + np.abs(start))
    assert np.all(np.abs(dep1 - sim1) <= bound + rounding)
    # later rounds train from adapters that differ by that much, and local AdamW steps do
    # not shrink such a difference (seen: 1.5e-8 after round 1, 2.9e-6 after round 2, of a
    # round-2 step of 1e-2): the last round is compared relative to its own step
    last_sim, last_dep = adapter(simulated, ROUNDS), adapter(deployment.out, ROUNDS)
    step = np.max(np.abs(last_sim - adapter(simulated, ROUNDS - 1)))
    assert np.max(np.abs(last_dep - last_sim)) <= 0.01 * step

    # what each owner uploaded in round 1, as the coordinator received it
    params = crypto.RoundParams(BITS, CLIP, 3)
    mean_delta = sim1 - start
    for k in range(3):
        replies = [json.loads(x) for x in (tmp_path / f"audit_{k}.jsonl").read_text().splitlines()]
        uploads = [r["records"]["masked"] for r in replies if "masked" in r.get("records", {})]
        assert len(uploads) == ROUNDS
        values = np.array(uploads[0]["values"], dtype=np.uint64)
        assert uploads[0]["arrays"]["vector"][:2] == ["uint64", [mean_delta.size + 1]]
        as_update = crypto.dequantise_sum(values[:-1], params, 1)  # the count entry last
        # an update would be a small vector near the round's mean; this is uniform noise
        # in [-c, c]: its mean |entry| is about c / 2, and it does not point anywhere
        assert np.mean(np.abs(as_update)) > CLIP / 4
        assert abs(np.corrcoef(as_update, mean_delta)[0, 1]) < 0.1
        lowest, highest = int(values[:-1].min()), int(values[:-1].max())
        assert lowest < 2**BITS // 10 and highest > 2**BITS - 2**BITS // 10


def tiny_start(deployment: Deployment) -> Path:
    """The starting adapter both runs train round 1 from, saved once."""
    cfg = load_config(None, deployment.overrides(deployment.root / "start"))
    path = deployment.root / "start.safetensors"
    save_file(get_adapter_state(CoordinatorSide.prepare(cfg).model), path)
    return path
