"""Simulated devices end to end on the tiny model: offline clients and stragglers dropped
untrained as the seed says, a simulated clock in every metrics line, rounds nobody could
join committed unchanged, and resumes bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedit.config import RunConfig, load_config
from fedit.engine.simulation import Simulation
from fedit.fleet import devices
from tests.conftest import tiny_run_overrides
from tests.integration.test_crash_resume import assert_same_run

SLOW = {  # client 4 takes 40 simulated seconds for its 2 steps: past the 10 s deadline
    "system.enabled": True,
    "system.dropout": 0.3,
    "system.deadline": 10.0,
    "system.speeds": [1.0, 1.0, 1.0, 1.0, 0.05],
}


def config(model_dir: Path, out: Path, **extra: object) -> RunConfig:
    return load_config(None, tiny_run_overrides(model_dir, out, **extra))


def lines(out: Path) -> list[dict]:
    text = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in text if json.loads(line)["round"] > 0]


def test_dropouts_and_stragglers_follow_the_seed_and_resume_bit_for_bit(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = config(tiny_model_dir, tmp_path / "straight", **SLOW)
    Simulation(cfg, show_progress=False).run()
    fleet = devices.devices(cfg, 5)
    clock = 0.0
    for r, line in enumerate(lines(tmp_path / "straight")):
        chosen = devices.round_candidates(cfg, 5, cfg.seed, r)
        online = devices.online_clients(cfg, fleet, r)
        reasons = {d["client"]: d["reason"] for d in line.get("dropped", [])}
        for k in chosen:
            if k not in online:
                assert reasons.pop(k).startswith("offline")
            elif k == 4:
                assert reasons.pop(k).startswith("straggler: 40.0 s > system.deadline 10 s")
        assert reasons == {}  # nobody else was dropped
        assert [c["id"] for c in line["clients"]] == [k for k in chosen if k in online and k != 4]
        dropped_any = any(k not in online or k == 4 for k in chosen)
        if dropped_any:
            assert line["simulated_seconds"] == 10.0
        else:
            assert 2.0 <= line["simulated_seconds"] < 2.1  # 2 steps of 1 s, and the links
        clock += line["simulated_seconds"]
        assert line["simulated_clock"] == clock
    resumed = config(tiny_model_dir, tmp_path / "resumed", **SLOW)
    Simulation(resumed, show_progress=False).run()
    shutil.rmtree(tmp_path / "resumed" / "round_0003")
    Simulation(resumed, show_progress=False).run(resume=True)
    assert_same_run(tmp_path / "resumed", tmp_path / "straight")


def test_rounds_nobody_joins_change_nothing_and_available_selection_avoids_them(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    rare = {"system.enabled": True, "system.availabilities": [1e-9] * 5}
    Simulation(config(tiny_model_dir, tmp_path / "rare", **rare), show_progress=False).run()
    for line in lines(tmp_path / "rare"):
        assert line["clients"] == [] and line["simulated_seconds"] == 0.0
    first = load_file(tmp_path / "rare" / "round_0001" / "adapter_model.safetensors")
    last = load_file(tmp_path / "rare" / "round_0003" / "adapter_model.safetensors")
    assert all(torch.equal(first[k], last[k]) for k in first)

    available = {**SLOW, "federation.selection": "available"}
    Simulation(config(tiny_model_dir, tmp_path / "av", **available), show_progress=False).run()
    reasons = [d["reason"] for line in lines(tmp_path / "av") for d in line.get("dropped", [])]
    assert not any(reason.startswith("offline") for reason in reasons)


def test_power_of_choice_trains_the_worst_fitted_candidates_and_resumes(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    poc = {"federation.selection": "power_of_choice", "federation.candidates": 4}
    cfg = config(tiny_model_dir, tmp_path / "straight", **poc)
    Simulation(cfg, show_progress=False).run()
    for line in lines(tmp_path / "straight"):
        probed = {int(k): v for k, v in line["selection"]["probed_loss"].items()}
        assert len(probed) == 4
        worst = sorted(sorted(probed, key=lambda k: -probed[k])[:2])
        assert [c["id"] for c in line["clients"]] == worst
    resumed = config(tiny_model_dir, tmp_path / "resumed", **poc)
    Simulation(resumed, show_progress=False).run()
    shutil.rmtree(tmp_path / "resumed" / "round_0003")
    Simulation(resumed, show_progress=False).run(resume=True)
    assert_same_run(tmp_path / "resumed", tmp_path / "straight")
