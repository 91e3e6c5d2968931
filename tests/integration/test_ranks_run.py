"""Mixed LoRA ranks end to end on the tiny model: each client's tensors cross the wire at
its rank, the two rank aggregations differ, exact zero padding folds a residual, and runs
resume bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedit.config import RunConfig, load_config
from fedit.engine.simulation import Simulation
from tests.conftest import tiny_run_overrides
from tests.integration.test_crash_resume import assert_same_run

MIXED = {"lora.client_ranks": [1, 2, 4, 2, 4], "federation.clients_per_round": 5}


def config(model_dir: Path, out: Path, **extra: object) -> RunConfig:
    return load_config(None, tiny_run_overrides(model_dir, out, **{**MIXED, **extra}))


def test_low_ranks_send_fewer_bytes_resume_bit_for_bit_and_the_aggregations_differ(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = config(tiny_model_dir, tmp_path / "straight")
    Simulation(cfg, show_progress=False).run()
    last = json.loads((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[-1])
    up = {c["id"]: c["bytes_up"] for c in last["clients"]}
    down = {c["id"]: c["bytes_down"] for c in last["clients"]}
    assert up[0] < up[1] < up[2] and down[0] < down[1] < down[2]  # ranks 1 < 2 < 4
    assert abs(up[1] - up[3]) < 16 and abs(up[2] - up[4]) < 16  # same rank, same tensors
    resumed = config(tiny_model_dir, tmp_path / "resumed")
    Simulation(resumed, show_progress=False).run()
    shutil.rmtree(tmp_path / "resumed" / "round_0003")
    Simulation(resumed, show_progress=False).run(resume=True)
    assert_same_run(tmp_path / "resumed", tmp_path / "straight")

    holders = config(
        tiny_model_dir, tmp_path / "holders", **{"strategy.rank_aggregation": "holders"}
    )
    Simulation(holders, show_progress=False).run()
    a = load_file(tmp_path / "straight" / "round_0003" / "adapter_model.safetensors")
    b = load_file(tmp_path / "holders" / "round_0003" / "adapter_model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_exact_zero_padding_runs_with_a_residual_and_resumes_bit_for_bit(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The residual also holds what each client's truncated start lacked of the merged
    model (each trains under its own base): a resumed run rebuilds those bases exactly."""
    exact = {"strategy.lora_aggregation": "exact"}
    cfg = config(tiny_model_dir, tmp_path / "exact", **exact)
    Simulation(cfg, show_progress=False).run()
    residual = list((tmp_path / "exact").glob("round_0003/*residual*"))
    assert residual  # the base absorbed what the zero-padded factor mean loses
    resumed = config(tiny_model_dir, tmp_path / "resumed", **exact)
    Simulation(resumed, show_progress=False).run()
    shutil.rmtree(tmp_path / "resumed" / "round_0003")
    Simulation(resumed, show_progress=False).run(resume=True)
    assert_same_run(tmp_path / "resumed", tmp_path / "exact")
