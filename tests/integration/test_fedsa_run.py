"""FedSA-LoRA (lora.shared = "A") end to end on the tiny model: the server averages the A
factors only, each client keeps its B factors on its own disk, half the adapter crosses
the wire, runs resume bit for bit, and `fedit personalize` scores the clients' own
adapters."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedit.client.own_factors import OwnFactors
from fedit.config import ConfigError, RunConfig, load_config
from fedit.engine.simulation import Simulation
from fedit.experiments.compare import compare_configs
from fedit.experiments.personalize import personalize
from tests.conftest import tiny_run_overrides
from tests.integration.test_crash_resume import assert_same_run

FEDSA = {"lora.shared": "A"}


def config(model_dir: Path, out: Path, **extra: object) -> RunConfig:
    return load_config(None, tiny_run_overrides(model_dir, out, **extra))


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter(out: Path, n: int) -> dict[str, torch.Tensor]:
    return load_file(out / f"round_{n:04d}" / "adapter_model.safetensors")


def test_the_server_averages_a_only_and_each_client_keeps_its_b(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "fedsa"
    Simulation(config(tiny_model_dir, out, **FEDSA), show_progress=False).run()
    for n in (1, 2, 3):
        for name, tensor in adapter(out, n).items():
            if "lora_B" in name:
                assert bool((tensor == 0).all()), (n, name)  # the global B stays B = 0
    first, last = adapter(out, 1), adapter(out, 3)
    assert any(not torch.equal(first[k], last[k]) for k in first if "lora_A" in k)
    records = lines(out)
    selected = {c["id"]: r["round"] for r in records for c in r.get("clients", [])}
    root = out / "own_factors"
    assert sorted(p.name for p in root.iterdir()) == sorted(f"client_{k}" for k in selected)
    for k, n in selected.items():  # its last round, and at most the one that started from
        files = sorted(p.name for p in (root / f"client_{k}").iterdir())
        assert files[-1] == f"round_{n:04d}.safetensors" and len(files) <= 2, files
    some = load_file(root / f"client_{k}" / files[-1])
    assert some and all("lora_B" in k and bool(t.abs().sum() > 0) for k, t in some.items())
    assert all("heldout" not in r for r in records)  # the global adapter is the base

    plain = tmp_path / "plain"
    Simulation(config(tiny_model_dir, plain), show_progress=False).run()
    for ours, theirs in zip(records[2:], lines(plain)[2:], strict=True):  # rounds 2, 3: B ≠ 0
        for a, b in zip(ours["clients"], theirs["clients"], strict=True):
            assert a["bytes_up"] < 0.6 * b["bytes_up"] and a["bytes_down"] < 0.6 * b["bytes_down"]

    resumed = tmp_path / "resumed"
    Simulation(config(tiny_model_dir, resumed, **FEDSA), show_progress=False).run()
    shutil.rmtree(resumed / "round_0003")
    Simulation(config(tiny_model_dir, resumed, **FEDSA), show_progress=False).run(resume=True)
    assert_same_run(resumed, out)


def test_whatever_a_client_sends_for_b_the_server_keeps_b_at_zero(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that sends its trained B_k too (here: every client) changes nothing."""
    honest = tmp_path / "honest"
    Simulation(config(tiny_model_dir, honest, **FEDSA), show_progress=False).run()
    keep = OwnFactors.keep

    def leaky(self, update, global_state, task):
        keep(self, update, global_state, task)
        return update  # the trained (A, B_k), B_k included

    monkeypatch.setattr(OwnFactors, "keep", leaky)
    leaked = tmp_path / "leaked"
    Simulation(config(tiny_model_dir, leaked, **FEDSA), show_progress=False).run()
    for n in (1, 2, 3):
        a, b = adapter(honest, n), adapter(leaked, n)
        assert all(torch.equal(a[k], b[k]) for k in a), n


def test_personalize_scores_each_clients_own_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "fedsa"
    cfg = config(tiny_model_dir, out, **FEDSA)
    Simulation(cfg, show_progress=False).run()
    scores = personalize(cfg, steps=0)
    selected = {c["id"]: r["round"] for r in lines(out) for c in r.get("clients", [])}
    assert [s.client for s in scores] == list(range(5))
    for s in scores:
        if s.client in selected:  # its own B_k moved its model away from the base
            assert s.personalised != s.global_adapter
        else:  # never selected: B = 0, its adapter is the global one
            assert s.personalised == s.global_adapter
    k = next(iter(selected))
    saved = load_file(out / "personalized" / f"client_{k}" / "adapter_model.safetensors")
    kept = load_file(out / "own_factors" / f"client_{k}" / f"round_{selected[k]:04d}.safetensors")
    final = adapter(out, 3)
    assert len(saved) == len(final) == 2 * len(kept)
    for name, tensor in saved.items():  # PEFT's file names drop the adapter's name
        expected = (
            kept[name.replace(".weight", ".default.weight")] if "lora_B" in name else final[name]
        )
        assert torch.equal(tensor, expected), name

    shutil.rmtree(out / "own_factors" / f"client_{k}")  # e.g. a deployment's: owners keep them
    with pytest.raises(ConfigError, match=f"client_{k}: no kept B factors of round"):
        personalize(cfg, steps=0)
    with pytest.raises(ConfigError, match="contender 'fedsa': lora.shared = 'A'"):
        compare_configs(cfg, {"fedsa": replace(cfg)}, tmp_path / "compare")
