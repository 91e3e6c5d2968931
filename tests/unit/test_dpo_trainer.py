"""The local DPO round on a tiny model: log-probs, the two references, training, hooks."""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from fedit.client.dpo import sequence_logps
from fedit.client.dpo_trainer import (
    _pair_batch,
    _response_logps,
    pair_logps,
    reference_logps,
    train_client_dpo,
)
from fedit.client.hooks import ClientHook
from fedit.client.trainer import NonFiniteTrainingError
from fedit.config import DPOConfig, LoraConfig, ModelConfig, TrainConfig
from fedit.data.preferences import synthetic_pairs, tokenize_pairs
from fedit.models.adapters import attach_lora, get_adapter_state, set_adapter_state
from fedit.models.loading import load_model
from tests.conftest import BadStep, CountingHook, check_token_cap_keeps_the_gradient

CFG = TrainConfig(micro_batch_size=2, grad_accum_steps=2, max_steps=4, mixed_precision="off")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_peft(tiny_model_dir: Path):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    return attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)


@pytest.fixture
def pairs(tiny_model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    raw = [p for p in synthetic_pairs(4, seed=0) if p.category in ("addition", "sentiment")]
    tokenized, _ = tokenize_pairs(raw, tokenizer, 64, 96, lambda p: f"Q: {p.prompt}\nA: ")
    return tokenized, tokenizer.pad_token_id


def perturb(model) -> None:
    """Give the adapter non-zero B so the policy differs from the base."""
    state = get_adapter_state(model)
    set_adapter_state(model, {k: v + 0.05 * torch.randn_like(v) for k, v in state.items()})


def test_label_only_logps_equal_sequence_logps_of_full_logits(tiny_peft, pairs) -> None:
    rows, pad_id = pairs
    perturb(tiny_peft)
    batch = _pair_batch(rows, [0, 1, 2], pad_id, torch.device("cpu"))
    fast, counts = _response_logps(tiny_peft, batch, logits_on_labels_only=True)
    logits = tiny_peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(fast, sequence_logps(logits, batch["labels"]), atol=1e-4)
    responses = [len(rows[i].chosen_ids) for i in range(3)] + [
        len(rows[i].rejected_ids) for i in range(3)
    ]
    assert counts.tolist() == responses  # response tokens only, prompts and padding masked


def test_references_base_disables_the_adapter_round_start_keeps_it(tiny_peft, pairs) -> None:
    rows, pad_id = pairs
    base_before = pair_logps(tiny_peft, rows, pad_id, batch_size=4)
    perturb(tiny_peft)
    everything = list(range(len(rows)))
    policy = pair_logps(tiny_peft, rows, pad_id, batch_size=3)
    base = reference_logps(tiny_peft, rows, everything, CFG, DPOConfig(reference="base"), pad_id)
    start = reference_logps(
        tiny_peft, rows, everything, CFG, DPOConfig(reference="round_start"), pad_id
    )
    assert torch.allclose(base, base_before, atol=1e-5)  # the adapter is really off
    assert not torch.allclose(base, policy, atol=1e-3)
    # round_start: before any step the policy is its own reference, every margin is zero
    assert torch.allclose(start, policy, atol=1e-5)
    assert tiny_peft.training  # the reference pass restores the training mode


def test_reference_covers_only_the_pairs_asked_for(tiny_peft, pairs) -> None:
    rows, pad_id = pairs
    ref = reference_logps(tiny_peft, rows, [1, 3], CFG, DPOConfig(), pad_id)
    assert torch.isfinite(ref[[1, 3]]).all() and torch.isnan(ref[[0, 2]]).all()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_rounds_widen_the_margin_and_call_hooks(tiny_peft, pairs, loss_type: str) -> None:
    rows, pad_id = pairs
    dpo = DPOConfig(beta=0.5, loss_type=loss_type, reference="base")
    hook = CountingHook()
    # lr 5e-3: at 2e-2 a 4-step round on 8 pairs overshoots and the loss zig-zags by round
    kwargs = dict(client_id=3, learning_rate=5e-3, pad_id=pad_id)
    first = train_client_dpo(tiny_peft, rows, CFG, dpo, seed=1, hook=hook, **kwargs)
    again = [train_client_dpo(tiny_peft, rows, CFG, dpo, seed=s, **kwargs) for s in (2, 3, 4)]
    assert again[-1].metrics["dpo_margin"] > first.metrics["dpo_margin"]
    assert again[-1].metrics["train_loss"] < first.metrics["train_loss"]
    assert hook.calls == {"start": 1, "loss_term": 8, "adjust": 4, "finish": 1}
    assert (first.client_id, first.num_steps, first.num_examples) == (3, 4, len(rows))
    metrics = first.metrics
    assert {"dpo_accuracy", "label_tokens", "computed_tokens", "reference_seconds"} <= set(metrics)
    assert metrics["computed_tokens"] >= metrics["real_tokens"] > metrics["label_tokens"] > 0


def test_same_seed_same_update(tiny_peft, pairs) -> None:
    rows, pad_id = pairs
    start = get_adapter_state(tiny_peft)
    kwargs = dict(client_id=0, learning_rate=1e-2, seed=5, pad_id=pad_id)
    first = train_client_dpo(tiny_peft, rows, CFG, DPOConfig(reference="round_start"), **kwargs)
    set_adapter_state(tiny_peft, start)
    again = train_client_dpo(tiny_peft, rows, CFG, DPOConfig(reference="round_start"), **kwargs)
    assert all(torch.equal(first.state[k], again.state[k]) for k in first.state)
    assert any(not torch.equal(first.state[k], start[k]) for k in start)


def test_a_non_finite_dpo_loss_stops_the_client(tiny_peft, pairs) -> None:
    rows, pad_id = pairs
    cfg = TrainConfig(micro_batch_size=2, grad_accum_steps=1, max_steps=3, mixed_precision="off")
    kwargs = dict(client_id=4, learning_rate=1e-2, seed=1, pad_id=pad_id)
    with pytest.raises(NonFiniteTrainingError, match="client 4: non-finite loss at local step 2"):
        train_client_dpo(tiny_peft, rows, cfg, DPOConfig(), hook=BadStep("nan_loss"), **kwargs)


def test_token_cap_per_forward_keeps_the_dpo_gradient(tiny_peft, pairs) -> None:
    rows, pad_id = pairs
    perturb(tiny_peft)  # non-zero B: every LoRA factor gets a gradient

    def train(cfg: TrainConfig, hook: ClientHook):
        kwargs = dict(client_id=0, learning_rate=1e-9, seed=1, pad_id=pad_id, hook=hook)
        return train_client_dpo(tiny_peft, rows, cfg, DPOConfig(), **kwargs)

    check_token_cap_keeps_the_gradient(train, cap=200)


def test_a_given_reference_is_used_and_sft_needs_one(tiny_peft, pairs) -> None:
    rows, pad_id = pairs
    kwargs = dict(client_id=0, learning_rate=1e-2, seed=5, pad_id=pad_id)
    with pytest.raises(ValueError, match="'sft' needs the SFT-end model's log-probs"):
        train_client_dpo(tiny_peft, rows, CFG, DPOConfig(reference="sft"), **kwargs)
    with pytest.raises(ValueError, match="does not match"):
        train_client_dpo(tiny_peft, rows, CFG, DPOConfig(), reference=torch.zeros(2, 2), **kwargs)
    # the base reference handed in gives the same round as the one computed inside
    start = get_adapter_state(tiny_peft)
    inside = train_client_dpo(tiny_peft, rows, CFG, DPOConfig(reference="base"), **kwargs)
    set_adapter_state(tiny_peft, start)
    base = reference_logps(tiny_peft, rows, range(len(rows)), CFG, DPOConfig(), pad_id)
    given = train_client_dpo(tiny_peft, rows, CFG, DPOConfig(), reference=base, **kwargs)
    assert all(torch.allclose(inside.state[k], given.state[k], atol=1e-6) for k in start)
