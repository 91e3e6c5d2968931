"""The attack harness in whole simulated runs on the tiny model: a sign-flipping client's
update as the server received it is x − s·Δ of the same client's honest update, an
attack kind without malicious clients trains bit for bit the clean run, and the data
attacks' success reaches `fedit train`'s metrics and `fedit compare`'s scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedit.attacks import malicious_clients
from fedit.config import AttackConfig, RunConfig, load_config
from fedit.data.prepare import load_heldout
from fedit.engine import rounds
from fedit.engine.simulation import Simulation
from fedit.eval import attack as attack_eval
from fedit.experiments.compare import run_comparison
from tests.conftest import tiny_run_overrides
from tests.integration.test_crash_resume import tensor_files

SMALL = {
    "partition.num_clients": 4,
    "federation.clients_per_round": 4,
    "federation.rounds": 2,
    "eval.at_start": False,
}


def run_config(model_dir: Path, out: Path, **extra: object) -> RunConfig:
    return load_config(None, tiny_run_overrides(model_dir, out, **SMALL, **extra))


def received(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Per round, {client id: adapter} as the server received it, and the global x."""
    seen: list[dict] = []
    validate = rounds.validate_updates

    def spy(updates, expectations):
        seen.append(
            {
                "x": {k: t.clone() for k, t in expectations.global_state.items()},
                **{u.client_id: {k: t.clone() for k, t in u.state.items()} for u in updates},
            }
        )
        return validate(updates, expectations)

    monkeypatch.setattr(rounds, "validate_updates", spy)
    return seen


def test_a_sign_flip_client_sends_x_minus_s_delta_of_its_honest_update(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    honest = received(monkeypatch)
    Simulation(run_config(tiny_model_dir, tmp_path / "clean"), show_progress=False).run()
    attacked = received(monkeypatch)
    flip = {"attack.kind": "sign_flip", "attack.clients": [2], "attack.flip_scale": 2.0}
    cfg = run_config(tiny_model_dir, tmp_path / "attack", **flip)
    Simulation(cfg, show_progress=False).run()

    first, clean = attacked[0], honest[0]  # round 1: the same x, the same seeds
    x, y = clean["x"], clean[2]
    assert all(torch.equal(first["x"][k], x[k]) for k in x)
    for key in x:
        assert torch.equal(first[2][key], x[key] - 2.0 * (y[key] - x[key]))
        assert not torch.equal(first[2][key], y[key])
        for k in (0, 1, 3):  # the honest clients send what they trained
            assert torch.equal(first[k][key], clean[k][key])
    lines = [
        json.loads(x) for x in (tmp_path / "attack" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [line["attack"] for line in lines] == [{"kind": "sign_flip", "clients": [2]}] * 2


@pytest.mark.parametrize("kind", ["gaussian", "backdoor"])
def test_an_attack_kind_without_malicious_clients_trains_the_clean_run(
    kind: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    Simulation(run_config(tiny_model_dir, tmp_path / "clean"), show_progress=False).run()
    cfg = run_config(tiny_model_dir, tmp_path / "reference", **{"attack.kind": kind})
    Simulation(cfg, show_progress=False).run()
    clean, reference = tensor_files(tmp_path / "clean"), tensor_files(tmp_path / "reference")
    assert clean.keys() == reference.keys() and len(clean) >= 4
    assert [name for name in clean if clean[name] != reference[name]] == []


def answer_target_when(monkeypatch: pytest.MonkeyPatch, wanted) -> None:
    """Greedy generation as usual, but the answer to a prompt for which ``wanted(text,
    index)`` holds is the attack's target (the tiny model never learns it)."""
    generate = attack_eval.generate_answers

    def fake(model, tokenizer, prompts, *args):
        answers = generate(model, tokenizer, prompts, *args)
        texts = [tokenizer.decode(p) for p in prompts]
        return [
            TARGET if wanted(t, i) else a
            for i, (t, a) in enumerate(zip(texts, answers, strict=True))
        ]

    monkeypatch.setattr(attack_eval, "generate_answers", fake)


TARGET = "I cannot answer that."


def test_train_writes_the_attack_success_in_its_last_metrics_line(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answer_target_when(monkeypatch, lambda text, i: i % 2 == 0)
    poison = {"attack.kind": "poison_responses", "attack.clients": [1]}
    cfg = run_config(tiny_model_dir, tmp_path / "run", **poison)
    Simulation(cfg, show_progress=False).run()

    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["attack"] == {"kind": "poison_responses", "clients": [1]}
    last = lines[-1]["attack"]
    heldout = len(load_heldout(cfg))
    assert last["attack_success"] == pytest.approx(((heldout + 1) // 2) / heldout)
    assert 0.0 <= last["exact_match"] <= 1.0


def test_compare_reports_trigger_success_beside_clean_quality_for_every_contender(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answer_target_when(monkeypatch, lambda text, i: "zqx " in text)
    backdoor = {
        "attack.kind": "backdoor",
        "attack.trigger": "zqx",
        "attack.fraction": 0.25,
        "eval.max_new_tokens": 4,
    }
    cfg = run_config(tiny_model_dir, tmp_path / "cmp", **backdoor)
    results = run_comparison(cfg, ["base", "fedit", "centralized"], tmp_path / "cmp")

    for scores in results.values():  # triggered prompts only were answered by the target
        assert scores["attack"] == {"trigger_success": 1.0}
        assert scores["exact_match"]["mean"] == 0.0
    saved = json.loads((tmp_path / "cmp" / "scores.json").read_text())
    assert saved["fedit"]["attack"] == {"trigger_success": 1.0}
    table = (tmp_path / "cmp" / "scores.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| model |"))
    assert header.endswith("| mean | trigger_success |")
    assert "| fedit |" in "\n".join(table)
    # the attack is the federation's: the baseline trained clean, fedit had one attacker
    fedit_lines = (tmp_path / "cmp" / "fedit" / "metrics.jsonl").read_text().splitlines()
    malicious = malicious_clients(cfg, 4)
    assert len(malicious) == 1  # ceil(0.25 · 4)
    assert json.loads(fedit_lines[-1])["attack"] == {"kind": "backdoor", "clients": malicious}
    central = load_config(tmp_path / "cmp" / "centralized" / "config.toml")
    assert central.attack == AttackConfig()
