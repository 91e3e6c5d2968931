"""Tiny random-initialised models with a byte-level tokenizer, built offline.

Tests, benchmarks of framework overhead and smoke runs use these instead of downloads:
``make_tiny_model(dir)`` writes an ordinary Hugging Face model directory that every
fedit command loads like any other local model; a Llama unless `family` names another
of FAMILIES (the model families the family matrix test runs).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# model_type -> what its config needs beyond the shared sizes (vocabulary, hidden size,
# layers, 4 heads, context): the families people tune, each with what sets it apart
# (Gemma's logit soft-caps and scaled embeddings, Phi-3's fused projections, GPT-2's
# Conv1D, Granite's logit scaling, ...) at its config's defaults.
LLAMA_LIKE = {"num_key_value_heads": 2, "tie_word_embeddings": True}
FAMILIES: dict[str, dict[str, object]] = {
    "llama": LLAMA_LIKE,
    "mistral": {"num_key_value_heads": 2},
    "qwen2": LLAMA_LIKE,
    "gemma2": {"num_key_value_heads": 2, "head_dim": 16},
    "gemma3_text": {"num_key_value_heads": 2, "head_dim": 16},
    "phi3": {"num_key_value_heads": 2},
    "gpt_neox": {},
    "gpt2": {},
    "granite": {**LLAMA_LIKE, "logits_scaling": 4.0},
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + ChatML specials): any text, no training."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def make_tiny_model(
    directory: str | Path,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerBase | None = None,
    context: int = 1024,
    family: str = "llama",
) -> Path:
    """Write a random model of `family` (hidden 64, 2 layers, 4 heads; 2 KV heads where the
    family has them) and its tokenizer (the byte-level one unless another is given, e.g.
    SmolLM2's for the W0 benchmark), with `context` positions."""
    directory = Path(directory)
    tokenizer = tokenizer or byte_tokenizer()
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **FAMILIES[family],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
