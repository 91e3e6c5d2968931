from pathlib import Path

import pytest
import torch
from peft import PeftModel

from fedit.config import ConfigError, LoraConfig, ModelConfig
from fedit.models.adapters import (
    adapter_parameters,
    attach_lora,
    get_adapter_state,
    require_full_precision_base,
    save_adapter,
    set_adapter_state,
    set_base_residual,
)
from fedit.models.loading import load_model, resolve_device, resolve_dtype
from fedit.models.tiny import make_tiny_model


def randomised_adapter(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(p.shape, generator=generator) * 0.1
        for name, p in adapter_parameters(model).items()
    }


def test_saved_adapter_reloads_with_peft_and_gives_same_logits(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    model = attach_lora(load_model(cfg), LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    state = randomised_adapter(model, seed=1)
    save_adapter(model, state, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    reloaded = PeftModel.from_pretrained(load_model(cfg), str(tmp_path / "adapter")).eval()
    inputs = torch.tensor([[5, 40, 41, 42, 2]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
        got = reloaded(input_ids=inputs).logits
    assert torch.allclose(expected, got, atol=1e-6)
    base = load_model(cfg).eval()
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=inputs).logits, got, atol=1e-3)


def test_state_swap_round_trip_and_name_check(tiny_model_dir: Path) -> None:
    model = attach_lora(
        load_model(ModelConfig(name_or_path=str(tiny_model_dir))),
        LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]),
        seed=0,
    )
    state = randomised_adapter(model, seed=3)
    set_adapter_state(model, state)
    assert all(torch.equal(v, state[k]) for k, v in get_adapter_state(model).items())
    assert all(".q_proj." in k or ".v_proj." in k for k in state)
    with pytest.raises(KeyError, match="missing"):
        set_adapter_state(model, dict(list(state.items())[1:]))


def test_last_layers_puts_lora_on_the_top_layers_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    model = attach_lora(load_model(cfg), LoraConfig(r=2, alpha=4, last_layers=1), seed=0)
    names = list(adapter_parameters(model))
    assert names and all(".layers.1." in name for name in names)  # the tiny model has 2 layers
    modules = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in names}
    assert modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # PEFT itself reloads it: layers_to_transform is in adapter_config.json
    save_adapter(model, randomised_adapter(model, seed=2), tmp_path / "top")
    reloaded = PeftModel.from_pretrained(load_model(cfg), str(tmp_path / "top"))
    assert sorted(n for n, _ in reloaded.named_parameters() if ".lora_" in n) == sorted(names)
    with pytest.raises(ConfigError, match="lora.last_layers: 3 is more than the model's 2"):
        attach_lora(load_model(cfg), LoraConfig(last_layers=3), seed=0)


def test_last_layers_on_gpt2_takes_its_conv1d_layers(tmp_path: Path) -> None:
    # GPT-2's projections are transformers' Conv1D (weights stored transposed), not Linear
    model_dir = make_tiny_model(tmp_path / "gpt2", hidden_size=32, family="gpt2")
    model = load_model(ModelConfig(name_or_path=str(model_dir)))
    model = attach_lora(model, LoraConfig(r=2, alpha=4, last_layers=1), seed=0)
    names = list(adapter_parameters(model))
    assert names and all(".h.1." in name for name in names)
    modules = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in names}
    assert modules == {"c_attn", "c_proj", "c_fc"}


def test_cpu_defaults_to_fp32() -> None:
    device = resolve_device("cpu")
    assert resolve_dtype("auto", device) == torch.float32
    assert resolve_dtype("bfloat16", device) == torch.bfloat16


def test_exact_aggregation_refuses_a_half_precision_base(tiny_model_dir: Path) -> None:
    # Prepare: the tiny model stored in bf16, as model.dtype = "auto" gives on most GPUs
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), dtype="bfloat16")
    model = attach_lora(load_model(cfg), LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    name = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    w0 = dict(model.named_parameters())[name].detach().clone()
    residual = torch.full(w0.shape, 1e-4)

    # W0 + R stored in bf16 (what set_base_residual used to write) loses much of R
    stored = (w0 + residual.to(torch.bfloat16)).float() - w0.float()
    assert (stored - residual).abs().mean() / 1e-4 > 0.2

    # Execute / Assert: refused, at load time and when setting the residual
    with pytest.raises(ConfigError, match=r'torch.bfloat16.*set model.dtype = "float32"'):
        require_full_precision_base(model)
    with pytest.raises(ConfigError, match=r'set model.dtype = "float32"'):
        set_base_residual(model, {}, {name: residual})
    assert torch.equal(dict(model.named_parameters())[name], w0)  # nothing written


def test_exact_aggregation_sets_fp32_base_weights_exactly(tiny_model_dir: Path) -> None:
    model = attach_lora(
        load_model(ModelConfig(name_or_path=str(tiny_model_dir))), LoraConfig(r=4), seed=0
    )
    require_full_precision_base(model)
    name = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    originals: dict[str, torch.Tensor] = {}
    w0 = dict(model.named_parameters())[name].detach().clone()
    residual = torch.full(w0.shape, 1e-4)
    set_base_residual(model, originals, {name: residual})
    assert torch.equal(dict(model.named_parameters())[name], w0 + residual)
    assert torch.equal(originals[name], w0)


def test_a_target_module_matching_nothing_is_refused(tiny_model_dir: Path) -> None:
    """PEFT only refuses when no entry matches; one typo among several would silently give
    a smaller adapter than asked for."""
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    cfg = LoraConfig(r=2, alpha=4, target_modules=["q_proj", "self_attn.v_proj", "v_prj"])
    with pytest.raises(ConfigError, match=r"lora.target_modules: 'v_prj' matches no module.*"):
        attach_lora(model, cfg, seed=0)
    linear = "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    with pytest.raises(ConfigError, match=rf"its decoder Linear layers: {linear};"):
        attach_lora(model, cfg, seed=0)


def test_eager_attention_is_loaded_when_asked_and_computes_the_same_logits(
    tiny_model_dir: Path,
) -> None:
    models = {
        name: load_model(ModelConfig(name_or_path=str(tiny_model_dir), attn_implementation=name))
        for name in ("sdpa", "eager")
    }
    assert {n: m.config._attn_implementation for n, m in models.items()} == {
        "sdpa": "sdpa",
        "eager": "eager",
    }
    inputs = torch.tensor([[5, 40, 41, 42, 2, 7, 9]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1]])  # left padding, as batched generation uses
    with torch.no_grad():
        sdpa, eager = (
            m.eval()(input_ids=inputs, attention_mask=mask).logits for m in models.values()
        )
    assert torch.allclose(sdpa[:, 1:], eager[:, 1:], atol=1e-5)
