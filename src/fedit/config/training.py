"""[train], [dpo] and [eval]: the local training loop every client runs, and the scoring."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedit.config.fields import require

OBJECTIVES = ("sft", "dpo", "sft_then_dpo")
DPO_LOSS_TYPES = ("sigmoid", "ipo")  # see fedit.client.dpo
DPO_REFERENCES = ("base", "round_start", "sft")
MAX_LOCAL_EPOCHS = 1000
# Optimizer steps one client may take in one round: far beyond any real run, it turns a
# mistyped train.max_steps or local_epochs into an error instead of a run that never ends.
MAX_STEPS_PER_ROUND = 1_000_000


@dataclass
class TrainConfig:
    """The local training loop every client runs each round."""

    micro_batch_size: int = 4  # records per micro-batch (with DPO: pairs)
    grad_accum_steps: int = 2  # optimizer batch = micro_batch_size * grad_accum_steps
    # split micro-batches further so no training forward exceeds this many padded tokens
    # (bounds peak activation memory on long records; a DPO pair counts both its sequences,
    # which stay in one forward). Same gradient only with lora.dropout = 0: dropout masks are
    # drawn per forward. None: micro_batch_size only.
    max_tokens_per_forward: int | None = None
    local_epochs: float = 1.0  # passes over a client's records per round (unless max_steps is set)
    max_steps: int | None = None  # optimizer steps per client per round; overrides local_epochs
    learning_rate: float = 1.5e-4  # the clients' AdamW learning rate
    lr_schedule: str = "constant"  # constant | cosine (decayed across rounds)
    min_lr: float = 0.0  # cosine floor
    weight_decay: float = 0.0  # the clients' AdamW weight decay
    # gradient-norm clipping of each optimizer step; 0: none (HF Trainer's convention). Not
    # optional: TOML has no null, so an unset value would read back from a saved config as 1.0
    max_grad_norm: float = 1.0
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
        require(
            self.objective in OBJECTIVES,
            "train.objective",
            f"must be one of {', '.join(OBJECTIVES)}",
        )
        require(self.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        require(self.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
        require(
            self.max_tokens_per_forward is None or self.max_tokens_per_forward >= 1,
            "train.max_tokens_per_forward",
            "must be >= 1 or unset",
        )
        require(
            0 < self.local_epochs <= MAX_LOCAL_EPOCHS,
            "train.local_epochs",
            f"must be in (0, {MAX_LOCAL_EPOCHS}]",
        )
        require(
            self.max_steps is None or 1 <= self.max_steps <= MAX_STEPS_PER_ROUND,
            "train.max_steps",
            f"must be in [1, {MAX_STEPS_PER_ROUND}] or unset",
        )
        require(self.learning_rate > 0, "train.learning_rate", "must be positive")
        require(
            self.lr_schedule in {"constant", "cosine"},
            "train.lr_schedule",
            "must be constant or cosine",
        )
        require(0 <= self.min_lr <= self.learning_rate, "train.min_lr", "must be in [0, lr]")
        require(
            self.mixed_precision in {"auto", "off", "bf16", "fp16"},
            "train.mixed_precision",
            "must be auto, off, bf16 or fp16",
        )
        require(
            self.max_grad_norm >= 0,
            "train.max_grad_norm",
            "must be >= 0 (0: no clipping)",
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
        require(self.beta > 0, "dpo.beta", "must be positive")
        require(0 <= self.label_smoothing < 0.5, "dpo.label_smoothing", "must be in [0, 0.5)")
        require(
            self.loss_type in DPO_LOSS_TYPES,
            "dpo.loss_type",
            f"must be one of {', '.join(DPO_LOSS_TYPES)}",
        )
        require(
            self.loss_type != "ipo" or self.label_smoothing == 0,
            "dpo.label_smoothing",
            "applies to loss_type = 'sigmoid' only",
        )
        require(
            self.reference in DPO_REFERENCES,
            "dpo.reference",
            f"must be one of {', '.join(DPO_REFERENCES)}",
        )
        require(self.max_prompt_len >= 1, "dpo.max_prompt_len", "must be >= 1")
        require(self.sft_rounds >= 0, "dpo.sft_rounds", "must be >= 0")


@dataclass
class EvalConfig:
    """Held-out evaluation after rounds."""

    every_rounds: int = 1  # evaluate held-out loss every N rounds (and after the last)
    at_start: bool = True  # also evaluate the starting model (metrics line "round": 0)
    batch_size: int = 8  # records (or preference pairs) per forward of the held-out scoring
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
    judge_url: str = "https://api.openai.com/v1"  # the judge's OpenAI-compatible endpoint
    judge_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the judge's API key
    judge_questions: int = 20  # held-out instructions the judge grades
    judge_against: str = "fedit"  # the contender compared pairwise with each other contender
    judge_max_tokens: int = 1024  # of each judgment (its explanation, then the verdict)

    def validate(self) -> None:
        require(self.every_rounds >= 1, "eval.every_rounds", "must be >= 1")
        require(self.judge_questions >= 1, "eval.judge_questions", "must be >= 1")
        require(self.judge_max_tokens >= 1, "eval.judge_max_tokens", "must be >= 1")
        require(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
