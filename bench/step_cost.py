"""What one optimizer step of the demo costs, by prompt template and LoRA depth.

    .venv/bin/python bench/step_cost.py            # all variants, results in bench/results/

Each variant trains the embedded SmolLM2-135M for a few steps with fedit's own trainer on
the same synthetic records (one per skill, so every step sees the same rows): the alpaca
template or the chat template with an empty system turn, LoRA on all 30 layers or on the
last N (``lora.last_layers``: the backward pass stops below them), batches of 8 or 4. It
reports seconds per step after one warm-up round; this is what sized ``configs/demo.toml``
for CPUs without native bf16 (docs/results.md). Run it alone: two torch jobs on two cores
slow each other several times.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from harness import machine_info, markdown_table, warn_if_busy, write_results

from fedit.client.precision import autocast_dtype
from fedit.client.trainer import train_client
from fedit.config import load_config
from fedit.data.synthetic import generate_records
from fedit.data.tokenize import tokenize_records
from fedit.models.adapters import attach_lora
from fedit.models.loading import load_model, load_tokenizer

# (name, template, system_prompt, last_layers, batch)
VARIANTS = [
    ("alpaca, all layers, batch 8", "alpaca", None, None, 8),
    ("chat + empty system, all layers, batch 8", "chat", "", None, 8),
    ("chat + empty system, last 15, batch 8", "chat", "", 15, 8),
    ("chat + empty system, last 10, batch 8", "chat", "", 10, 8),
    ("chat + empty system, last 10, batch 4 (the demo)", "chat", "", 10, 4),
]


def step_seconds(template: str, system: str | None, last: int | None, batch: int, steps: int):
    cfg = load_config("configs/demo.toml")
    tokenizer = load_tokenizer(cfg.model)
    records = generate_records(per_skill=8, seed=0)[::8][:8][:batch]
    examples, _ = tokenize_records(records, tokenizer, template, 128, system_prompt=system)
    lora = replace(cfg.lora, last_layers=last)
    model = attach_lora(load_model(cfg.model), lora, cfg.seed)
    train = replace(cfg.train, micro_batch_size=batch, grad_accum_steps=1, max_steps=steps)
    kwargs = {"client_id": 0, "learning_rate": 1e-3, "seed": 0, "pad_id": tokenizer.pad_token_id}
    train_client(model, examples, replace(train, max_steps=1), **kwargs)  # warm-up
    update = train_client(model, examples, train, **kwargs)
    tokens = sum(len(e.input_ids) for e in examples) / len(examples)
    return update.metrics["step_seconds"] / steps, tokens, autocast_dtype("auto", model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    args = parser.parse_args()
    warn_if_busy()
    rows, results = [], []
    for name, template, system, last, batch in VARIANTS:
        seconds, tokens, dtype = step_seconds(template, system, last, batch, args.steps)
        results.append({"variant": name, "seconds_per_step": seconds, "tokens_per_row": tokens})
        rows.append([name, f"{tokens:.0f}", f"{seconds:.2f}"])
        print(f"{name}: {seconds:.2f} s/step ({tokens:.0f} tokens a row)", flush=True)
    base = results[0]["seconds_per_step"]
    for row, result in zip(rows, results, strict=True):
        row.append(f"{result['seconds_per_step'] / base:.2f}x")
    print(markdown_table(["variant", "tokens/row", "s/step", "vs first"], rows))
    payload = {
        "machine": machine_info(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "compute_dtype": str(dtype or torch.float32),
        "threads": torch.get_num_threads(),
        "results": results,
    }
    print(f"results: {write_results('step_cost', payload)}")


if __name__ == "__main__":
    main()
