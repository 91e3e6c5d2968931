"""LoRA adapters through PEFT, and moving adapter tensors in and out of one base model.

The simulation keeps a single base model in memory; clients take turns by copying their
adapter tensors into its LoRA parameters (a few MB), instead of rebuilding models or
round-tripping adapters through disk as the reference codes do.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from fedit.config import ConfigError, LoraConfig
from fedit.models.lora_dropout import share_dropout_masks
from fedit.types import AdapterState

# exact LoRA aggregation: what a run folded into the frozen base weights, beside the adapter
BASE_RESIDUAL = "base_residual.safetensors"
LINEAR_LAYERS = (torch.nn.Linear, Conv1D)  # Conv1D: GPT-2's Linear, weights transposed


def attach_lora(model: PreTrainedModel, cfg: LoraConfig, seed: int) -> PeftModel:
    """Wrap the base model with freshly initialised LoRA adapters (B = 0, A seeded)."""
    targets: str | list[str] = (
        "all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    )
    if isinstance(targets, list):
        _check_targets(model, targets)
    layers = None
    if cfg.last_layers is not None:
        num_layers = model.config.num_hidden_layers
        if cfg.last_layers > num_layers:
            raise ConfigError(
                f"lora.last_layers: {cfg.last_layers} is more than the model's {num_layers} layers"
            )
        layers = list(range(num_layers - cfg.last_layers, num_layers))
        if targets == "all-linear":  # PEFT takes layers_to_transform with named modules only
            targets = decoder_linear_names(model)
    peft_config = PeftLoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        layers_to_transform=layers,
    )
    torch.manual_seed(seed)  # A's random init is part of the run's reproducibility
    peft_model = get_peft_model(model, peft_config)
    if cfg.dropout_mask == "per_input":
        share_dropout_masks(peft_model)
    return peft_model


def decoder_linear_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the linear layers inside numbered decoder blocks (q_proj, ..., down_proj;
    GPT-2's c_attn, c_proj, c_fc, which are transformers' Conv1D, as PEFT's "all-linear"
    counts them): what "all-linear" means once the LM head is left out."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, LINEAR_LAYERS) and re.search(r"\.\d+\.", name)
        }
    )


def _check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """Every lora.target_modules entry must name a module, as PEFT matches a list: the full
    name or its last dotted parts. PEFT itself only refuses when none matches at all."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        verb = "matches" if len(missing) == 1 else "match"
        raise ConfigError(
            f"lora.target_modules: {', '.join(map(repr, missing))} {verb} no module of the "
            f"model (its decoder Linear layers: {', '.join(decoder_linear_names(model))}; "
            "or use ['all-linear'])"
        )


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable (adapter) parameters by name; the base model is frozen."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def get_adapter_state(model: torch.nn.Module) -> AdapterState:
    """A detached fp32 copy of the adapter on the CPU (what a client would send)."""
    return {
        name: p.detach().to("cpu", torch.float32, copy=True)
        for name, p in adapter_parameters(model).items()
    }


@torch.no_grad()
def set_adapter_state(model: torch.nn.Module, state: AdapterState) -> None:
    """Copy adapter tensors into the model's LoRA parameters; names must match exactly."""
    params = adapter_parameters(model)
    missing = params.keys() - state.keys()
    unexpected = state.keys() - params.keys()
    if missing or unexpected:
        raise KeyError(
            f"adapter state does not match the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    for name, param in params.items():
        param.copy_(state[name])


@torch.no_grad()
def add_to_base_weights(model: torch.nn.Module, residual: dict[str, torch.Tensor]) -> None:
    """Add server-computed residuals (exact LoRA aggregation) into frozen base weights."""
    params = dict(model.named_parameters())
    for name, delta in residual.items():
        params[name].add_(delta.to(params[name].device, params[name].dtype))


def in_base_layout(
    model: torch.nn.Module, delta_w: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Weight updates keyed "<LoRA module>.base_layer.weight", each out × in as B·A is, in
    the layout of the base weight they are added to: transposed where the LoRA layer has
    fan_in_fan_out (GPT-2's Conv1D stores its weight in × out, and PEFT's delta is (B·A)ᵀ
    there), so that W0 + R merges as PEFT merges the adapter."""
    modules = dict(model.named_modules())
    out = {}
    for name, delta in delta_w.items():
        layer = modules[name.removesuffix(".base_layer.weight")]
        out[name] = delta.T.contiguous() if getattr(layer, "fan_in_fan_out", False) else delta
    return out


EXACT_DTYPES = (torch.float32, torch.float64)  # base weights that hold W0 + R exactly


def _check_exact_dtype(name: str, weight: torch.Tensor) -> None:
    if weight.dtype not in EXACT_DTYPES:
        raise ConfigError(
            f"strategy.lora_aggregation = 'exact' folds the aggregation residual into the base "
            f"weights, but {name} is {weight.dtype} (model.dtype, or 'auto' on a GPU), which "
            "would round the residual away (1e-4 on a weight of 0.03 loses about half in "
            'bfloat16): set model.dtype = "float32" for exact aggregation'
        )


def require_full_precision_base(model: torch.nn.Module) -> None:
    """Refuse a model whose LoRA-wrapped base weights are not fp32/fp64 (exact mode only)."""
    for name, param in model.named_parameters():
        if name.endswith(".base_layer.weight"):
            _check_exact_dtype(name, param)


@torch.no_grad()
def set_base_residual(
    model: torch.nn.Module, originals: dict[str, torch.Tensor], residual: dict[str, torch.Tensor]
) -> None:
    """Set frozen base weights to W0 + R, R the cumulative exact-aggregation residual.

    Setting from the original W0 each round, rather than adding each round's residual in
    turn, gives bit-identical weights in an uninterrupted run, a resumed one (which only
    has the saved R) and an exported model (W0 + R). `originals` caches W0 on first use.
    Half-precision or quantised weights are refused (ConfigError): they cannot hold W0 + R.
    """
    params = dict(model.named_parameters())
    for name in residual:
        _check_exact_dtype(name, params[name])
    for name, total in residual.items():
        base = originals.setdefault(name, params[name].detach().clone())
        params[name].copy_(base + total.to(base.device, base.dtype))


def lora_scaling(cfg: LoraConfig) -> float:
    return cfg.alpha / cfg.r


def save_adapter(model: PeftModel, state: AdapterState, directory: str | Path) -> None:
    """Write `state` in the standard PEFT layout (adapter_config.json +
    adapter_model.safetensors), loadable with PeftModel.from_pretrained."""
    set_adapter_state(model, state)
    model.save_pretrained(str(directory))


EXACT_LOADING_NOTE = """\
This round was trained with strategy.lora_aggregation = "exact": part of the global update
was folded into the frozen base weights and is saved in base_residual.safetensors.
Plain PeftModel.from_pretrained(base, this_directory) ignores that file and gives a
different model. Load this directory with fedit:

    from fedit.models.adapters import load_saved_adapter
    model = load_saved_adapter(base_model, "this_directory")

or write a standalone merged model (W0 + residual + s*BA) that plain transformers loads:

    fedit export --adapter this_directory --out merged-model
    AutoModelForCausalLM.from_pretrained("merged-model")
"""


def write_exact_loading_note(directory: str | Path) -> None:
    """LOADING.txt in an exact-aggregation round directory: how to load it correctly.

    The checkpoint writer calls this beside base_residual.safetensors, since the directory
    otherwise looks like a plain PEFT adapter.
    """
    (Path(directory) / "LOADING.txt").write_text(EXACT_LOADING_NOTE)


def load_saved_adapter(model: PreTrainedModel, directory: str | Path) -> PeftModel:
    """Base model + a saved global adapter, with any exact-aggregation residual that the
    run folded into the base weights (base_residual.safetensors beside the adapter).

    This, or `fedit export`, is how exact-aggregation rounds must be loaded: plain
    PeftModel.from_pretrained ignores the residual."""
    from safetensors.torch import load_file

    peft_model = PeftModel.from_pretrained(model, str(directory))
    residual_file = Path(directory) / BASE_RESIDUAL
    if residual_file.exists():
        add_to_base_weights(peft_model, load_file(str(residual_file)))
    return peft_model
