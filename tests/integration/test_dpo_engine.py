"""Federated DPO end to end on the tiny model and synthetic preference pairs (seconds each)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from fedit.client import dpo_trainer
from fedit.client.dpo import preference_scores
from fedit.client.dpo_trainer import pair_logps
from fedit.config import ModelConfig, RunConfig, load_config
from fedit.engine.simulation import Simulation
from fedit.experiments import compare
from fedit.models.adapters import load_saved_adapter
from fedit.models.inference import load_for_inference
from fedit.models.loading import load_model
from fedit.server.strategies import STRATEGIES
from fedit.server.strategies.fedavgm import FedAvgM
from tests.conftest import tiny_run_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def dpo_config(model_dir: Path, output_dir: Path, **extra: object) -> RunConfig:
    """Pure DPO over 3 clients of synthetic pairs (category shards), all sampled each round."""
    values: dict[str, object] = {
        "data.path": "",
        "data.preference_path": "synthetic",
        "train.objective": "dpo",
        "data.max_seq_len": 160,
        "dpo.max_prompt_len": 128,
        "dpo.beta": 0.5,
        "partition.num_clients": 3,
        "federation.clients_per_round": 3,
        "train.max_steps": 3,
        "train.learning_rate": 1e-2,
        **extra,
    }
    return load_config(None, tiny_run_overrides(model_dir, output_dir, **values))


def run(cfg: RunConfig) -> list[dict]:
    Simulation(cfg, show_progress=False).run()
    path = Path(cfg.output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def adapter(run_dir: Path, round_number: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / f"round_{round_number:04d}" / "adapter_model.safetensors"))


def test_federated_dpo_raises_heldout_preference_accuracy_and_margin(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    lines = run(dpo_config(tiny_model_dir, tmp_path / "run"))
    assert [line["round"] for line in lines] == [0, 1, 2, 3]
    start, end = lines[0]["heldout_dpo"]["overall"], lines[-1]["heldout_dpo"]["overall"]
    # round 0: the adapter starts at B = 0, so the policy is the base: every reward is 0
    assert start == {"accuracy": 0.0, "margin": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0,
                     "pairs": 20}  # fmt: skip
    assert end["accuracy"] >= 0.6 and end["margin"] > 0.05
    assert {"addition", "uppercase"} <= lines[-1]["heldout_dpo"].keys()
    assert "heldout" not in lines[-1]  # no SFT data, no held-out loss
    assert all(line["objective"] == "dpo" for line in lines[1:])
    client = lines[-1]["clients"][0]
    assert {"train_loss", "dpo_accuracy", "dpo_margin", "label_tokens"} <= client.keys()
    assert (tmp_path / "run" / "round_0003" / "adapter_config.json").is_file()


def test_round_start_reference_equals_base_in_the_first_round_only(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    runs = {}
    # fp32: "base" fixes every pair's log-probs at once and "round_start" those the round
    # uses, so a pair can land in batches of other padded lengths, and bf16 kernels (AMX)
    # round such batches differently: equal there up to bf16 rounding, not bit for bit
    exact = {"lora.dropout": 0.0, "train.mixed_precision": "off"}
    for reference in ("base", "round_start"):
        cfg = dpo_config(
            tiny_model_dir,
            tmp_path / reference,
            **{"dpo.reference": reference, "federation.rounds": 2, **exact},
        )
        runs[reference] = run(cfg)
        assert runs[reference][0]["heldout_dpo"]["overall"]["margin"] == 0.0
        assert runs[reference][-1]["heldout_dpo"]["overall"]["margin"] != 0.0
    # round 1: the global adapter has B = 0, so "round_start" is the base: zero margins
    # before training and the very same update; round 2 starts from a trained adapter
    first = [adapter(tmp_path / ref, 1) for ref in runs]
    assert all(torch.equal(first[0][k], first[1][k]) for k in first[0])
    second = [adapter(tmp_path / ref, 2) for ref in runs]
    assert any(not torch.equal(second[0][k], second[1][k]) for k in second[0])


def test_sft_then_dpo_switches_objective_after_sft_rounds(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = dpo_config(
        tiny_model_dir,
        tmp_path / "run",
        **{
            "data.path": "synthetic",
            "data.max_seq_len": 384,
            "train.objective": "sft_then_dpo",
            "dpo.sft_rounds": 1,
        },
    )
    lines = run(cfg)
    assert [line.get("objective") for line in lines] == [None, "sft", "dpo", "dpo"]
    assert not any("dpo_accuracy" in c for c in lines[1]["clients"])
    assert all("dpo_accuracy" in c for line in lines[2:] for c in line["clients"])
    # both held-out views every evaluation: SFT loss and preference scores
    assert all({"heldout", "heldout_dpo"} <= line.keys() for line in lines)
    assert lines[1]["heldout"]["overall"]["loss"] < lines[0]["heldout"]["overall"]["loss"]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_runs_a_dpo_round(tiny_model_dir: Path, tmp_path: Path, name: str) -> None:
    cfg = dpo_config(
        tiny_model_dir,
        tmp_path / name,
        **{
            "strategy.name": name,
            "strategy.server_lr": 0.01 if name.startswith("fedad") or name == "fedyogi" else 1.0,
            "federation.rounds": 1,
            "train.max_steps": 1,
            "eval.at_start": False,
        },
    )
    [line] = run(cfg)
    assert line["objective"] == "dpo" and len(line["clients"]) == 3
    assert math.isfinite(line["heldout_dpo"]["overall"]["margin"])
    assert all(torch.isfinite(v).all() for v in adapter(tmp_path / name, 1).values())


def test_dpo_resume_gives_identical_final_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    extra = {"dpo.reference": "round_start", "federation.rounds": 2, "eval.at_start": False}
    run(dpo_config(tiny_model_dir, tmp_path / "a", **extra))
    resumed = dpo_config(tiny_model_dir, tmp_path / "b", **extra)
    run(resumed)
    shutil.rmtree(tmp_path / "b" / "round_0002")  # as if the run died during round 2
    Simulation(resumed, show_progress=False).run(resume=True)
    final, expected = adapter(tmp_path / "b", 2), adapter(tmp_path / "a", 2)
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def sft_then_dpo(model_dir: Path, output_dir: Path, **extra: object) -> RunConfig:
    """Two SFT rounds then one DPO round over 3 clients, all sampled each round."""
    values = {
        "data.path": "synthetic",
        "data.max_seq_len": 384,
        "train.objective": "sft_then_dpo",
        "dpo.sft_rounds": 2,
        "eval.at_start": False,
        "train.max_steps": 2,
        **extra,
    }
    return dpo_config(model_dir, output_dir, **values)


def test_server_state_starts_fresh_when_dpo_takes_over(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    # Prepare: record the server state each aggregate starts from
    seen: list[dict[str, torch.Tensor]] = []
    original = FedAvgM.aggregate

    def aggregate(self, global_state, updates, round_index):
        seen.append(self.state_dict())
        return original(self, global_state, updates, round_index)

    monkeypatch.setattr(FedAvgM, "aggregate", aggregate)

    # Execute
    run(sft_then_dpo(tiny_model_dir, tmp_path / "run", **{"strategy.name": "fedavgm"}))

    # Assert: round 2 (SFT) steps with round 1's momentum; round 3, the first DPO round,
    # starts from none: SFT momentum does not push the DPO rounds
    assert len(seen) == 3
    assert seen[0] == {} and seen[1] != {}
    assert seen[2] == {}


def test_resume_across_the_switch_is_bit_exact(tiny_model_dir: Path, tmp_path: Path) -> None:
    # SCAFFOLD's state is reset at the switch; the "sft" reference (with the exact-mode
    # residual) is the round-2 model, reloaded from its checkpoint by a later resume
    extra = {
        "strategy.name": "scaffold",
        "strategy.lora_aggregation": "exact",
        "dpo.reference": "sft",
        "federation.rounds": 4,
    }
    run(sft_then_dpo(tiny_model_dir, tmp_path / "a", **extra))
    resumed = sft_then_dpo(tiny_model_dir, tmp_path / "b", **extra)
    run(resumed)
    expected_state = load_file(str(tmp_path / "a" / "round_0004" / "server_state.safetensors"))
    # crash during round 4 (resume after the switch), then during round 4 with round 3 lost
    # as well (resume from the last SFT round, right at the switch)
    for lost in (["round_0004"], ["round_0004", "round_0003"]):
        for name in lost:
            shutil.rmtree(tmp_path / "b" / name)
        Simulation(resumed, show_progress=False).run(resume=True)
        final, expected = adapter(tmp_path / "b", 4), adapter(tmp_path / "a", 4)
        assert all(torch.equal(final[k], expected[k]) for k in expected), lost
        state = load_file(str(tmp_path / "b" / "round_0004" / "server_state.safetensors"))
        assert state.keys() == expected_state.keys()
        assert all(torch.equal(state[k], expected_state[k]) for k in state), lost


def record_references(monkeypatch) -> dict[int, list[tuple[object, torch.Tensor]]]:
    """Per client's pairs (by identity): the reference log-probs of each DPO step, in order."""
    seen: dict[int, list[tuple[object, torch.Tensor]]] = {}
    original = dpo_trainer._accumulate

    def accumulate(model, pairs, batch, lengths, reference, *args):
        seen.setdefault(id(pairs), []).append((pairs, reference.clone()))
        return original(model, pairs, batch, lengths, reference, *args)

    monkeypatch.setattr(dpo_trainer, "_accumulate", accumulate)
    return seen


def logps_under(model_dir: Path, pairs, adapter_dir: Path | None) -> torch.Tensor:
    """(N, 2) log-probs of `pairs` under a fresh base model (W0), with a saved adapter."""
    model = load_model(ModelConfig(name_or_path=str(model_dir)))
    if adapter_dir is not None:
        model = load_saved_adapter(model, adapter_dir)
    pad_id = AutoTokenizer.from_pretrained(model_dir).pad_token_id
    return pair_logps(model, pairs, pad_id=pad_id, batch_size=2)


FIXED = {"lora.dropout": 0.0, "train.mixed_precision": "off", "train.max_steps": 2}


def test_sft_reference_is_the_sft_end_model_for_every_dpo_round(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    seen = record_references(monkeypatch)
    extra = {"dpo.sft_rounds": 1, "federation.rounds": 3, "dpo.reference": "sft", **FIXED}
    run(sft_then_dpo(tiny_model_dir, tmp_path / "run", **extra))

    assert len(seen) == 3  # clients
    for steps in seen.values():
        pairs = steps[0][0]
        round_2, round_3 = steps[0][1], steps[2][1]  # 2 steps per DPO round
        assert torch.equal(round_2, round_3)  # fixed across DPO rounds
        expected = logps_under(tiny_model_dir, pairs, tmp_path / "run" / "round_0001")
        assert torch.allclose(round_2, expected, atol=1e-5)


def test_base_reference_is_w0_in_exact_lora_aggregation(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    seen = record_references(monkeypatch)
    extra = {"strategy.lora_aggregation": "exact", "federation.rounds": 2, **FIXED}
    run(dpo_config(tiny_model_dir, tmp_path / "run", **extra))

    residual = load_file(str(tmp_path / "run" / "round_0001" / "base_residual.safetensors"))
    assert any(t.abs().max() > 0 for t in residual.values())  # round 2 has W0 + R as base
    for steps in seen.values():
        pairs, round_2 = steps[-1]
        used = torch.isfinite(round_2[:, 0])
        expected = logps_under(tiny_model_dir, pairs, None)  # W0, as held-out scores use
        assert torch.allclose(round_2[used], expected[used], atol=1e-5)


def test_compare_scores_preferences_against_w0_in_exact_lora_aggregation(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    extra = {"strategy.lora_aggregation": "exact", "federation.rounds": 2, **FIXED}
    cfg = dpo_config(tiny_model_dir, tmp_path / "run", **extra)
    run(cfg)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def capture(policy, reference, categories, beta):
        seen.append((policy, reference))
        return preference_scores(policy, reference, categories, beta)

    monkeypatch.setattr(compare, "preference_scores", capture)
    final = tmp_path / "run" / "round_0002"
    for adapter_dir in (final, None):
        tokenizer, model = load_for_inference(cfg, adapter_dir)
        compare.preference_accuracy(cfg, model, tokenizer, adapter_dir)
    (policy, reference), (w0, _) = seen
    assert not torch.allclose(policy, w0, atol=1e-3)  # the run moved the model
    assert torch.allclose(reference, w0, atol=1e-5)  # π_base is W0, not W0 + R


def conversation_pairs(path: Path, count: int) -> Path:
    """TRL conversational pairs: a system turn, an earlier exchange, the question, two replies."""
    rows = []
    for i in range(count):
        a, b = i % 7, i % 5 + 1
        prompt = [
            {"role": "system", "content": "Answer with a number."},
            {"role": "user", "content": f"What is {a}+{a}?"},
            {"role": "assistant", "content": str(a + a)},
            {"role": "user", "content": f"And {a}+{b}?"},
        ]
        rows.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": str(a + b)}],
            "rejected": [{"role": "assistant", "content": f"{a + b + 3}, I think"}],
            "category": ("small", "large")[i % 2],
        })  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_multi_turn_conversation_pairs_train_under_the_chat_template(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    pairs = conversation_pairs(tmp_path / "pairs.jsonl", 16)
    cfg = dpo_config(
        tiny_model_dir,
        tmp_path / "run",
        **{"data.preference_path": str(pairs), "data.template": "chat"},
        **{"partition.num_clients": 2, "federation.clients_per_round": 2, "federation.rounds": 2},
    )
    lines = run(cfg)
    assert [line["round"] for line in lines] == [0, 1, 2]
    assert lines[-1]["heldout_dpo"]["overall"]["pairs"] == 4  # 2 per category held out
    for client in lines[-1]["clients"]:
        assert math.isfinite(client["train_loss"]) and client["label_tokens"] > 0
    assert any(t.abs().sum() > 0 for n, t in adapter(tmp_path / "run", 2).items() if "lora_B" in n)
