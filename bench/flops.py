"""Training FLOP/s against what this CPU's matrix multiply can do, measured in one run.

A speed-up claim needs a ceiling: this script measures (1) the rate of torch's matrix
multiply on this machine, fp32 and bf16, at the shapes of the embedded SmolLM2-135M's
linear layers for a batch of 1,024 tokens (and one large square product, the machine's
best case), and (2) fedit's trainer on W1's first client (bench/configs/w1.toml: LoRA r=8
on q_proj,v_proj, batch 8, with fedit's defaults), whose arithmetic it counts from the
model's shapes and the tokens each step computed. The ratio of (2) to (1) says how much
of the step is matrix arithmetic at the machine's rate and how much is everything else
(attention's softmax, norms, activations, LoRA dropout, optimizer, framework).

Counted per computed (padded) token, as multiply-adds x 2, with the base frozen:
  forward: every decoder linear layer (in x out), LoRA's A and B, and the attention scores
           and weighted values (2 x sequence x head dim per head; causal masking is not
           credited, since SDPA on CPU computes the full products);
  backward: the input gradients of the same (the frozen weights get no weight gradient),
           plus LoRA's weight gradients;
  LM head: forward and input gradient (hidden x vocab) on the label positions only, as
           fedit computes it (train.logits_on_labels_only).

    .venv/bin/python bench/flops.py               # ~3 min on a 2-core machine
    .venv/bin/python bench/flops.py --steps 2     # shorter

Prints a markdown table; raw results go to bench/results/flops-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from harness import (
    machine_info,
    markdown_table,
    publish,
    warm_w1_trainer,
    warn_if_busy,
)

from fedit.client.precision import autocast_dtype
from fedit.client.trainer import train_client

TOKENS = 1024  # rows of each timed product: a batch of 8 x 128 tokens


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """FLOP/s of (m x k) @ (k x n) in `dtype`, repeated for about `seconds` after a warm-up."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    torch.mm(a, b)
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        torch.mm(a, b)
        calls += 1
    return 2 * m * k * n * calls / elapsed


def linear_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(in, out) of each frozen decoder linear layer of a LoRA model (not LoRA's own A and
    B, nor the LM head)."""
    head = model.get_base_model().get_output_embeddings()
    return [
        (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not head and ".lora_" not in name
    ]


def model_rate(shapes: list[tuple[int, int]], dtype: torch.dtype) -> float:
    """The rate over the model's linear layers at TOKENS rows: each distinct shape timed,
    weighted by the FLOPs the model spends in it."""
    flops = seconds = 0.0
    for k, n in set(shapes):
        work = shapes.count((k, n)) * 2 * TOKENS * k * n
        flops += work
        seconds += work / matmul_rate(TOKENS, k, n, dtype, seconds=0.5)
    return flops / seconds


def counted_flops(config, lora_r: int, computed: int, row_length: float, labels: int) -> float:
    """FLOPs of the counted training work (the module docstring) for LoRA on q_proj and
    v_proj of every layer."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    linear = layers * (2 * hidden * q + 2 * hidden * kv + 3 * hidden * config.intermediate_size)
    lora = layers * lora_r * ((hidden + q) + (hidden + kv))
    attention = layers * 2 * row_length * q  # per token: scores, then weighted values
    forward = 2 * computed * (linear + lora + attention)
    backward = 2 * computed * (linear + 2 * lora + 2 * attention)
    head = 2 * 2 * labels * hidden * config.vocab_size
    return forward + backward + head


def train_steps(steps: int) -> dict:
    """fedit's trainer (W1's config) on W1's first client: `steps` timed after one."""
    cfg, model, examples, kwargs = warm_w1_trainer([])
    timed = train_client(model, examples, replace(cfg.train, max_steps=steps), seed=1, **kwargs)
    m = timed.metrics
    rows = steps * cfg.train.batch_size
    row_length = m["computed_tokens"] / rows  # mean padded row
    config = model.get_base_model().config
    flops = counted_flops(config, cfg.lora.r, m["computed_tokens"], row_length, m["label_tokens"])
    dtype = autocast_dtype(cfg.train.mixed_precision, model)
    return {
        "steps": steps,
        "step_seconds": m["step_seconds"],
        "computed_tokens": m["computed_tokens"],
        "label_tokens": m["label_tokens"],
        "mean_padded_row": row_length,
        "counted_flops": flops,
        "achieved_flops_per_second": flops / m["step_seconds"],
        "compute_dtype": str(dtype or torch.float32),
        "shapes": linear_shapes(model),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    args = parser.parse_args()
    warn_if_busy()
    machine = machine_info() | {"capability": torch.backends.cpu.get_cpu_capability()}
    training = train_steps(args.steps)  # sets torch's threads to all cores for the rates too
    shapes = training.pop("shapes")
    rates = {
        "fp32 model shapes": model_rate(shapes, torch.float32),
        "bf16 model shapes": model_rate(shapes, torch.bfloat16),
        "fp32 2048 square": matmul_rate(2048, 2048, 2048, torch.float32),
        "bf16 2048 square": matmul_rate(2048, 2048, 2048, torch.bfloat16),
    }
    achieved = training["achieved_flops_per_second"]
    rows = [[name, f"{rate / 1e9:.1f}", f"{achieved / rate:.0%}"] for name, rate in rates.items()]
    rows.insert(0, [f"fedit training ({training['compute_dtype']})", f"{achieved / 1e9:.1f}", "-"])
    payload = {"machine": machine, "args": vars(args), "training": training, "rates": rates}
    publish("flops", payload, markdown_table(["what", "GFLOP/s", "training / this"], rows))


if __name__ == "__main__":
    main()
