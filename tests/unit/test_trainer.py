from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from fedit.client import trainer as trainer_module
from fedit.client.batching import collate
from fedit.client.hooks import ClientHook, ScaffoldHook
from fedit.client.loss import row_loss_sums
from fedit.client.precision import half_precision_frozen_weights
from fedit.client.trainer import (
    NonFiniteTrainingError,
    round_learning_rate,
    steps_per_round,
    train_client,
)
from fedit.config import LoraConfig, ModelConfig, TrainConfig
from fedit.data.synthetic import generate_records
from fedit.data.tokenize import tokenize_records
from fedit.models.adapters import attach_lora, get_adapter_state, set_adapter_state
from fedit.models.loading import load_model
from fedit.ops.aggregation import zeros_like
from tests.conftest import BadStep, CountingHook, check_token_cap_keeps_the_gradient


@pytest.fixture
def tiny_peft(tiny_model_dir: Path):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    return attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)


@pytest.fixture
def examples(tiny_model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = generate_records(4, seed=0, skills=["addition", "uppercase"])
    return tokenize_records(records, tokenizer, "alpaca", 512)[0], tokenizer.pad_token_id


def test_steps_per_round_and_cosine_schedule() -> None:
    cfg = TrainConfig(micro_batch_size=4, grad_accum_steps=2, local_epochs=1.0)
    assert steps_per_round(20, cfg) == 3
    assert steps_per_round(20, TrainConfig(max_steps=7)) == 7
    cosine = TrainConfig(learning_rate=1e-3, lr_schedule="cosine", min_lr=1e-4)
    assert round_learning_rate(cosine, 0, 5) == pytest.approx(1e-3)
    assert round_learning_rate(cosine, 2, 5) == pytest.approx(5.5e-4)
    assert round_learning_rate(cosine, 4, 5) == pytest.approx(1e-4)


def test_label_only_logits_equal_full_logits(tiny_peft, examples) -> None:
    rows, pad_id = examples
    batch = collate([(e.input_ids, e.labels) for e in rows[:4]], pad_id, torch.device("cpu"))
    fast, counts_fast = row_loss_sums(tiny_peft, batch, logits_on_labels_only=True)
    full, counts_full = row_loss_sums(tiny_peft, batch, logits_on_labels_only=False)
    assert torch.equal(counts_fast, counts_full)
    assert torch.allclose(fast, full, atol=1e-5)


def test_loss_is_on_response_tokens_only(tiny_peft, examples) -> None:
    rows, pad_id = examples
    example = rows[0]
    batch = collate([(example.input_ids, example.labels)], pad_id, torch.device("cpu"))
    _, counts = row_loss_sums(tiny_peft, batch, logits_on_labels_only=True)
    assert int(counts[0]) == sum(label != -100 for label in example.labels)


def test_training_lowers_loss_and_calls_hooks(tiny_peft, examples) -> None:
    rows, pad_id = examples
    cfg = TrainConfig(micro_batch_size=2, grad_accum_steps=2, max_steps=12, learning_rate=1e-2)
    hook = CountingHook()
    first = train_client(
        tiny_peft, rows, cfg, client_id=0, learning_rate=1e-2, seed=1, pad_id=pad_id, hook=hook
    )
    second = train_client(
        tiny_peft, rows, cfg, client_id=0, learning_rate=1e-2, seed=2, pad_id=pad_id
    )
    assert second.metrics["train_loss"] < first.metrics["train_loss"]
    assert hook.calls == {"start": 1, "loss_term": 24, "adjust": 12, "finish": 1}
    assert first.extras["seen"]["steps"].item() == 12
    assert first.num_steps == 12 and first.num_examples == len(rows)


def test_same_seed_same_update(tiny_peft, examples) -> None:
    rows, pad_id = examples
    cfg = TrainConfig(micro_batch_size=2, grad_accum_steps=1, max_steps=3, learning_rate=1e-2)
    start = get_adapter_state(tiny_peft)
    kwargs = dict(client_id=0, learning_rate=1e-2, seed=5, pad_id=pad_id)
    first = train_client(tiny_peft, rows, cfg, **kwargs)
    set_adapter_state(tiny_peft, start)
    again = train_client(tiny_peft, rows, cfg, **kwargs)
    assert all(torch.equal(first.state[k], again.state[k]) for k in first.state)
    assert any(not torch.equal(first.state[k], start[k]) for k in start)


def _train_bf16(model, rows, pad_id, half_weights: bool):
    cfg = TrainConfig(micro_batch_size=2, grad_accum_steps=2, max_steps=3, mixed_precision="bf16")
    initial = get_adapter_state(model)
    with half_precision_frozen_weights(model, cfg.mixed_precision, enabled=half_weights):
        state = train_client(
            model, rows, cfg, client_id=0, learning_rate=1e-2, seed=3, pad_id=pad_id
        ).state
    set_adapter_state(model, initial)
    return state


def test_half_precision_frozen_weights_train_bit_identically_and_are_restored(
    tiny_peft, examples
) -> None:
    rows, pad_id = examples
    frozen = {name: p for name, p in tiny_peft.named_parameters() if "lora_" not in name}
    with_autocast_casts = _train_bf16(tiny_peft, rows, pad_id, half_weights=False)
    with_half_weights = _train_bf16(tiny_peft, rows, pad_id, half_weights=True)
    assert with_autocast_casts.keys() == with_half_weights.keys()
    for key, tensor in with_autocast_casts.items():
        assert torch.equal(tensor, with_half_weights[key]), key
    after = dict(tiny_peft.named_parameters())
    assert all(after[name] is p and p.dtype == torch.float32 for name, p in frozen.items())


def test_half_precision_frozen_weights_cast_frozen_linears_only(tiny_peft) -> None:
    with half_precision_frozen_weights(tiny_peft, "bf16"):
        dtypes = {name: p.dtype for name, p in tiny_peft.named_parameters()}
    assert dtypes["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == (
        torch.bfloat16
    )
    assert all(
        dtypes[name] == torch.float32 for name in dtypes if "lora_" in name or "norm" in name
    )
    with half_precision_frozen_weights(tiny_peft, "off"):
        assert all(p.dtype == torch.float32 for p in tiny_peft.parameters())
    with pytest.raises(RuntimeError), half_precision_frozen_weights(tiny_peft, "bf16"):
        raise RuntimeError("a failing round")
    assert all(p.dtype == torch.float32 for p in tiny_peft.parameters())


def test_token_cap_per_forward_keeps_the_gradient(tiny_peft, examples) -> None:
    rows, pad_id = examples

    def train(cfg: TrainConfig, hook: ClientHook):
        kwargs = dict(client_id=0, learning_rate=1e-9, seed=1, pad_id=pad_id, hook=hook)
        return train_client(tiny_peft, rows, cfg, **kwargs)

    check_token_cap_keeps_the_gradient(train, cap=64)


# --- non-finite steps: skipped under fp16 loss scaling, an error without it ---------------


class ScaffoldWithBadSecondStep(ScaffoldHook, BadStep):
    def __init__(self, zeros) -> None:
        ScaffoldHook.__init__(self, zeros, zeros)
        BadStep.__init__(self, "inf_gradient")


def test_a_step_skipped_by_loss_scaling_is_counted_and_kept_out_of_scaffold(
    tiny_peft, examples, monkeypatch
) -> None:
    # Prepare: a real GradScaler (enabled on the CPU), as fp16 on a GPU would use
    rows, pad_id = examples
    monkeypatch.setattr(
        trainer_module, "grad_scaler", lambda mode, model: torch.amp.GradScaler("cpu")
    )
    cfg = TrainConfig(micro_batch_size=2, grad_accum_steps=1, max_steps=4, mixed_precision="off")
    hook = ScaffoldWithBadSecondStep(zeros_like(get_adapter_state(tiny_peft)))

    # Execute
    update = train_client(
        tiny_peft, rows, cfg, client_id=0, learning_rate=1e-3, seed=1, pad_id=pad_id, hook=hook
    )

    # Assert: one of 4 steps skipped; c_k⁺ is the mean raw gradient of the other 3
    assert update.metrics["skipped_steps"] == 1
    assert hook._steps == 3
    control_delta = update.extras["control_delta"]
    assert all(torch.isfinite(t).all() for t in control_delta.values())
    assert all(torch.isfinite(t).all() for t in update.state.values())


@pytest.mark.parametrize(
    ("hook", "what"),
    [(BadStep("nan_loss"), "loss"), (BadStep("inf_gradient"), "gradients")],
    ids=["nan-loss", "inf-gradient"],
)
def test_a_non_finite_step_without_loss_scaling_stops_the_client(
    tiny_peft, examples, hook: ClientHook, what: str
) -> None:
    rows, pad_id = examples
    cfg = TrainConfig(micro_batch_size=2, grad_accum_steps=1, max_steps=4, mixed_precision="off")
    with pytest.raises(
        NonFiniteTrainingError, match=rf"client 7: non-finite {what} at local step 2"
    ) as err:
        train_client(
            tiny_peft, rows, cfg, client_id=7, learning_rate=1e-3, seed=1, pad_id=pad_id, hook=hook
        )
    assert (err.value.client_id, err.value.step) == (7, 2)
