"""Shared fixtures: a tiny random Llama written once per session, and small run configs."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from fedit.client.hooks import ClientHook
from fedit.config import RunConfig, TrainConfig, load_config
from fedit.models.tiny import byte_tokenizer, make_tiny_model
from fedit.types import ClientUpdate

# Tiny models gain nothing from a second thread, and one thread keeps the suite from
# oversubscribing the cores when anything else runs beside it.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# Every fedit config the repository ships: the experiments' and the benchmarks'
SHIPPED_CONFIGS = sorted([*REPO.glob("configs/**/*.toml"), *REPO.glob("bench/configs/*.toml")])
# The CLI of the fedit these tests import, wherever it is installed (not REPO/.venv's)
FEDIT = [sys.executable, "-m", "fedit.cli.main"]
DOLLY = REPO.parent / "shared" / "data" / "databricks-dolly-15k.jsonl"


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and the tests share the CPU with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def tiny_local_client(tiny_model_dir: Path, **options: object):
    """(model with a rank-4 LoRA, a LocalClient of 4 tokenised records) for client 0: an
    honest, uncompressed client unless `options` say otherwise (e.g. own=, rank=)."""
    from transformers import AutoTokenizer

    from fedit.client.session import LocalClient
    from fedit.config import DPOConfig, LoraConfig, ModelConfig
    from fedit.data.synthetic import generate_records
    from fedit.data.tokenize import tokenize_records
    from fedit.models.adapters import attach_lora
    from fedit.models.loading import load_model

    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    model = attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = generate_records(4, seed=0, skills=["addition", "uppercase"])
    rows = tokenize_records(records, tokenizer, "alpaca", 512)[0]
    parts = {"privacy": None, "attack": None, "compressor": None, "own": None, **options}
    client = LocalClient(0, rows, [], tokenizer.pad_token_id, DPOConfig(), **parts)
    return model, client


def tiny_run_overrides(model_dir: Path, output_dir: Path, **extra: object) -> list[str]:
    """Overrides for a seconds-long federation on the tiny model and synthetic skills."""
    values: dict[str, object] = {
        "output_dir": str(output_dir),
        "model.name_or_path": str(model_dir),
        "data.path": "synthetic",
        "data.synthetic_per_skill": 12,
        "data.heldout_per_category": 2,
        "data.max_seq_len": 384,
        "partition.num_clients": 5,
        "federation.rounds": 3,
        "federation.clients_per_round": 2,
        "train.max_steps": 2,
        "train.micro_batch_size": 2,
        "train.grad_accum_steps": 2,
        "train.learning_rate": 5e-3,
        "lora.r": 4,
        "lora.alpha": 8,
        "lora.dropout": 0.1,
    }
    values.update(extra)
    return [f"{k}={_toml(v)}" for k, v in values.items()]


def _toml(value: object) -> str:
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


@pytest.fixture
def tiny_config(tiny_model_dir: Path, tmp_path: Path) -> RunConfig:
    return load_config(None, tiny_run_overrides(tiny_model_dir, tmp_path / "run"))


# A hook that counts the trainer's calls at each hook point (SFT and DPO trainers).
class CountingHook(ClientHook):
    def __init__(self) -> None:
        self.calls = {"start": 0, "loss_term": 0, "adjust": 0, "finish": 0}

    def start(self, params):
        self.calls["start"] += 1

    def loss_term(self, params):
        self.calls["loss_term"] += 1
        return None

    def adjust_gradients(self, params):
        self.calls["adjust"] += 1
        assert all(p.grad is not None for p in params.values())

    def finish(self, params, num_steps, learning_rate):
        self.calls["finish"] += 1
        return {"seen": {"steps": torch.tensor(float(num_steps))}}


class InfGradient(torch.autograd.Function):
    """A zero loss term whose gradient is inf: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.shape = x.shape
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.full(ctx.shape, float("inf"))


# A hook that spoils one optimizer step (give the trainer one micro-batch per step): its
# loss is NaN ("nan_loss"), or its loss is finite and a gradient inf ("inf_gradient").
class BadStep(ClientHook):
    def __init__(self, kind: str, step: int = 2) -> None:
        self.kind, self.step, self.calls = kind, step, 0

    def loss_term(self, params):
        self.calls += 1
        if self.calls != self.step:
            return None
        if self.kind == "nan_loss":
            return torch.tensor(float("nan"))
        return InfGradient.apply(next(iter(params.values())))


# Keeps a copy of the first step's gradients (before clipping and AdamW).
class GradientRecorder(ClientHook):
    def __init__(self) -> None:
        self.first: dict[str, torch.Tensor] = {}

    def adjust_gradients(self, params) -> None:
        if not self.first:
            self.first = {name: p.grad.clone() for name, p in params.items()}


def check_token_cap_keeps_the_gradient(
    train: Callable[[TrainConfig, ClientHook], ClientUpdate], cap: int
) -> None:
    """One step of `train(cfg, hook)` without and with train.max_tokens_per_forward = cap
    (fp32: bf16 rounding would depend on the padded width): the cap must split the batch,
    and the first gradients must agree."""
    recorders, tokens = [], []
    for max_tokens in (None, cap):
        cfg = TrainConfig(
            micro_batch_size=8,
            grad_accum_steps=1,
            max_steps=1,
            max_tokens_per_forward=max_tokens,
            mixed_precision="off",
        )
        recorder = GradientRecorder()
        tokens.append(train(cfg, recorder).metrics["computed_tokens"])
        recorders.append(recorder)
    assert tokens[1] < tokens[0]  # the cap split the batch (and cut its padding)
    for name, grad in recorders[0].first.items():
        assert torch.allclose(grad, recorders[1].first[name], rtol=1e-4, atol=1e-7), name


# ---- tokenizers whose end of turn is not eos, or that split a text's parts differently

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def chatml_base_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2.5 base's arrangement: ChatML turns end with <|im_end|>, eos is <|endoftext|>."""
    tokenizer = byte_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"
    return tokenizer


def gemma_like_tokenizer() -> PreTrainedTokenizerFast:
    """Gemma instruct's arrangement: turns end with <end_of_turn>, eos is <eos>."""
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens(
        {"bos_token": "<bos>", "eos_token": "<eos>"}
        | {"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}
    )
    tokenizer.chat_template = GEMMA_TEMPLATE
    return tokenizer


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-2's kind: a Metaspace pre-tokenizer that puts ▁ before the first word of any
    text tokenised on its own (a tiny BPE trained here, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    from fedit.data.records import Record
    from fedit.data.templates import render_prompt

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    core.decoder = decoders.Metaspace(prepend_scheme="first")
    lines = [*render_prompt(Record("Name a color.", ""), "alpaca", None).splitlines()]
    lines += ["Red is a color.", "Blue, too."]
    trainer = trainers.BpeTrainer(
        vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=["\n", "▁"]
    )
    core.train_from_iterator(lines, trainer)  # line by line: no merge across a newline
    return LlamaTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
