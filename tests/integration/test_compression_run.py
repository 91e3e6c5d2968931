"""Compressed uploads end to end on the tiny model: fewer bytes up, error feedback that
changes what is aggregated and lives on the clients' disks, and resumes bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedit.config import ConfigError, RunConfig, load_config
from fedit.engine.simulation import Simulation
from fedit.experiments.compare import Contender
from tests.conftest import tiny_run_overrides
from tests.integration.test_crash_resume import assert_same_run


def config(model_dir: Path, out: Path, **extra: object) -> RunConfig:
    return load_config(None, tiny_run_overrides(model_dir, out, **extra))


def bytes_up(out: Path) -> list[int]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [c["bytes_up"] for line in lines if line["round"] > 0 for c in line["clients"]]


def final_adapter(out: Path) -> dict:
    return load_file(out / "round_0003" / "adapter_model.safetensors")


TOPK = {"compression.upload": "topk", "compression.topk_fraction": 0.2}


def test_top_k_with_error_feedback_resumes_bit_for_bit(tiny_model_dir: Path, tmp_path: Path):
    straight = config(tiny_model_dir, tmp_path / "straight", **TOPK)
    Simulation(straight, show_progress=False).run()
    crashed = config(tiny_model_dir, tmp_path / "crashed", **TOPK)
    Simulation(crashed, show_progress=False).run()
    shutil.rmtree(tmp_path / "crashed" / "round_0003")  # as if the run died in round 3
    Simulation(crashed, show_progress=False).run(resume=True)
    assert_same_run(tmp_path / "crashed", tmp_path / "straight")  # memories included
    memories = sorted((tmp_path / "straight" / "feedback").glob("client_*/round_*.safetensors"))
    assert memories  # each sampled client kept what top-k dropped, on its own "disk"


def test_compressed_uploads_cost_fewer_bytes_and_feedback_changes_the_sum(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    runs = {
        "plain": {},
        "int8": {"compression.upload": "int8"},
        "topk": TOPK,
        "topk_no_feedback": {**TOPK, "compression.error_feedback": False},
    }
    for name, extra in runs.items():
        Simulation(config(tiny_model_dir, tmp_path / name, **extra), show_progress=False).run()
    plain = bytes_up(tmp_path / "plain")
    for name in ("int8", "topk"):
        assert all(c < p / 2 for c, p in zip(bytes_up(tmp_path / name), plain, strict=True))
    assert not (tmp_path / "topk_no_feedback" / "feedback").exists()
    with_memory, without = (
        final_adapter(tmp_path / "topk"),
        final_adapter(tmp_path / "topk_no_feedback"),
    )
    assert any(not (with_memory[k] == without[k]).all() for k in with_memory)


def test_compression_is_a_federations_and_not_secure_aggregations(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="compression.upload: must be 'none' with secagg"):
        config(tiny_model_dir, tmp_path, **TOPK, **{"secagg.enabled": True})
    with pytest.raises(ConfigError, match="compression.upload: applies to federation.mode"):
        config(tiny_model_dir, tmp_path, **TOPK, **{"federation.mode": "centralized"})
    cfg = config(tiny_model_dir, tmp_path, **TOPK)
    assert Contender("centralized").config(cfg, tmp_path).compression.upload == "none"
    assert Contender("fedit").config(cfg, tmp_path).compression.upload == "topk"
