"""fedit's loss is the model's own loss, for families that post-process their logits.

Gemma-2/3 soft-cap the logits, Cohere multiplies them by `logit_scale`, Granite divides
them by `logits_scaling`: a loss computed as cross-entropy of lm_head(hidden) is another
number. Each tiny random model below sets such a value far from neutral, and large weights
(`initializer_range`) make the logits large enough that the cap or scale changes the loss.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GraniteConfig,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
)

from fedit.client.batching import IGNORE_INDEX, collate
from fedit.client.dpo import sequence_logps
from fedit.client.dpo_trainer import _response_logps
from fedit.client.loss import row_loss_sums
from fedit.config import LoraConfig
from fedit.models.adapters import attach_lora

VOCAB = 97
DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.5,
    tie_word_embeddings=False,
)
CONFIGS: dict[str, PretrainedConfig] = {
    "llama": LlamaConfig(**DECODER),
    "qwen2": Qwen2Config(**DECODER),
    "gemma2": Gemma2Config(**DECODER, head_dim=8, final_logit_softcapping=2.0),
    "gemma3": Gemma3TextConfig(**DECODER, head_dim=8, final_logit_softcapping=2.0),
    "cohere": CohereConfig(**DECODER, logit_scale=4.0),
    "granite": GraniteConfig(**DECODER, logits_scaling=0.25),
    "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, initializer_range=0.5),
}


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[family], attn_implementation="eager").eval()


def _batch() -> dict[str, torch.Tensor]:
    """Two right-padded rows of unequal length; the prompt part carries no label."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for length, prompt in ((11, 4), (7, 3)):
        ids = torch.randint(0, VOCAB, (length,), generator=generator).tolist()
        rows.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return collate(rows, pad_id=0, device=torch.device("cpu"))


def _model_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    return float(model(**batch).loss)


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("labels_only", [True, False])
@torch.no_grad()
def test_loss_equals_the_models_own_loss(family: str, labels_only: bool) -> None:
    model, batch = _model(family), _batch()
    sums, counts = row_loss_sums(model, batch, logits_on_labels_only=labels_only)
    assert float(sums.sum() / counts.sum()) == pytest.approx(_model_loss(model, batch), rel=1e-5)


@torch.no_grad()
def test_loss_through_a_lora_wrapper_keeps_the_soft_cap() -> None:
    model = attach_lora(_model("gemma2"), LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    batch = _batch()
    sums, counts = row_loss_sums(model, batch, logits_on_labels_only=True)
    assert float(sums.sum() / counts.sum()) == pytest.approx(_model_loss(model, batch), rel=1e-5)


@torch.no_grad()
def test_dpo_log_probs_are_the_models_own() -> None:
    model, batch = _model("gemma2"), _batch()
    logps, _ = _response_logps(model, batch, logits_on_labels_only=True)
    full = sequence_logps(model(**batch).logits, batch["labels"])
    assert torch.allclose(logps, full, rtol=1e-5)


class _NoKeep(torch.nn.Module):
    """A causal LM whose forward cannot limit its logits (no logits_to_keep)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


class _IgnoresKeep(_NoKeep):
    """One that takes logits_to_keep but returns every position's logits."""

    def forward(self, input_ids, attention_mask, logits_to_keep=None):  # type: ignore[override]
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


class _SlicesPositions(_NoKeep):
    """Remote code (or a transformers release before boolean masks) that slices as
    hidden[:, logits_to_keep, :]: a (batch, length) mask does not index that."""

    def forward(self, input_ids, attention_mask, logits_to_keep=0):  # type: ignore[override]
        logits = self.inner(input_ids=input_ids, attention_mask=attention_mask).logits
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return type("Out", (), {"logits": logits[:, keep, :]})


class _OddShape(_NoKeep):
    def forward(self, input_ids, attention_mask, logits_to_keep=None):  # type: ignore[override]
        return type("Out", (), {"logits": torch.zeros(3, 5, 7, VOCAB)})


@pytest.mark.parametrize("wrapper", [_NoKeep, _IgnoresKeep, _SlicesPositions])
@torch.no_grad()
def test_a_forward_that_cannot_keep_label_logits_is_scored_on_full_logits(wrapper) -> None:
    inner, batch = _model("cohere"), _batch()
    sums, counts = row_loss_sums(wrapper(inner), batch, logits_on_labels_only=True)
    assert float(sums.sum() / counts.sum()) == pytest.approx(_model_loss(inner, batch), rel=1e-5)


@torch.no_grad()
def test_logits_of_an_unknown_shape_are_refused() -> None:
    with pytest.raises(ValueError, match="_OddShape: logits of shape"):
        row_loss_sums(_OddShape(_model("cohere")), _batch(), logits_on_labels_only=True)


@torch.no_grad()
def test_a_transformers_without_boolean_logits_to_keep_gets_no_mask(monkeypatch) -> None:
    """transformers releases before slice_logits_to_keep slice every family's hidden states
    by position: fedit then asks for the full logits instead of passing a mask."""
    import transformers.modeling_utils

    monkeypatch.delattr(transformers.modeling_utils, "slice_logits_to_keep")
    inner, batch = _model("llama"), _batch()
    asked = []
    original = type(inner).forward

    @functools.wraps(original)  # keeps the signature fedit reads
    def spy(self, **kw):
        asked.append(kw)
        return original(self, **kw)

    monkeypatch.setattr(type(inner), "forward", spy)
    sums, counts = row_loss_sums(inner, batch, logits_on_labels_only=True)
    assert asked and all("logits_to_keep" not in kw for kw in asked)
    assert float(sums.sum() / counts.sum()) == pytest.approx(_model_loss(inner, batch), rel=1e-5)
