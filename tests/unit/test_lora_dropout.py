"""LoRA dropout with one mask per input: shared where modules read the same activations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedit.config import ConfigError, LoraConfig, ModelConfig, load_config
from fedit.models.adapters import attach_lora
from fedit.models.loading import load_model
from fedit.models.lora_dropout import InputSharedDropout, _LastInput


def lora_inputs(model_dir: Path, dropout_mask: str) -> dict[str, torch.Tensor]:
    """What each LoRA A of the first layer receives in one training forward."""
    model = load_model(ModelConfig(name_or_path=str(model_dir)))
    lora = LoraConfig(r=4, alpha=8, dropout=0.5, dropout_mask=dropout_mask)
    model = attach_lora(model, lora, seed=0)
    model.train()
    seen: dict[str, torch.Tensor] = {}
    layer = model.get_base_model().model.layers[0]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"):
        module = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
        module.lora_A["default"].register_forward_pre_hook(
            lambda _m, args, name=name: seen.__setitem__(name, args[0])
        )
    torch.manual_seed(1)
    model(input_ids=torch.randint(3, 200, (2, 16))).logits.sum().backward()
    return seen


def test_modules_reading_one_input_share_its_mask(tiny_model_dir: Path) -> None:
    shared = lora_inputs(tiny_model_dir, "per_input")
    assert shared["q_proj"] is shared["k_proj"] is shared["v_proj"]
    assert shared["gate_proj"] is shared["up_proj"]
    assert not torch.equal(shared["q_proj"], shared["o_proj"])  # another input, its own mask
    own = lora_inputs(tiny_model_dir, "per_module")  # PEFT's: a mask per module
    assert not torch.equal(own["q_proj"], own["k_proj"])


def test_the_shared_mask_is_standard_dropout() -> None:
    dropout = InputSharedDropout(0.25, _LastInput()).train()
    x = torch.ones(200, 500)
    out = dropout(x)
    assert dropout(x) is out  # the same tensor again: its dropped copy
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / 0.75))  # the rest scaled up
    assert (out == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)
    x.add_(0)  # modified in place: a new mask
    assert dropout(x) is not out
    assert dropout.eval()(x) is x


def test_gradients_flow_through_the_shared_copy() -> None:
    dropout = InputSharedDropout(0.5, _LastInput()).train()
    x = torch.randn(4, 6, requires_grad=True)
    a, b = torch.randn(6, 3), torch.randn(6, 3)
    first, second = dropout(x), dropout(x)  # two modules reading x
    assert first is second
    ((first @ a).sum() + (second @ b).sum()).backward()
    mask = (first != 0).float() * 2  # the one mask, scaled by 1/(1 - p)
    assert torch.allclose(x.grad, mask * (a + b).sum(1))


def test_config_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="lora.dropout_mask: must be one of per_module"):
        load_config(None, ["data.path=x.jsonl", "lora.dropout_mask=shared"])
