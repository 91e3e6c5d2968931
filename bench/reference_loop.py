"""A plain-PyTorch federated loop doing the W1 work the way the reference codes do it.

This is the yardstick `bench/w1.py` compares fedit against, not a second fedit. It runs
W1 (../shared/data/README.md) with fedit's model loading, tokenisation and client selection,
so base model, data and sampled clients are identical, but trains the way Shepherd and
OpenFedLLM effectively do: each batch of 8 in random order is padded to its longest row,
the LM head runs over every position (HF's `model(..., labels=...)` loss), fp32, no
autocast; AdamW (weight decay 0) and gradient clipping at 1.0 as HF's Trainer defaults;
FedAvg weighted by record count, by hand; the global adapter saved each round. The
held-out loss is fedit's `heldout_loss` on the final adapter, as for every W1 variant.

    .venv/bin/python bench/reference_loop.py --output-dir /tmp/ref   # full W1, ~15 min
    .venv/bin/python bench/reference_loop.py --output-dir /tmp/ref --rounds 1 \
        --clients-per-round 1 --steps 1                              # smoke run

Prints one JSON line: wall (model load, data prep, training, checkpoints; no evaluation),
evaluation time, per-round and in-step seconds, token counts, peak RSS, held-out loss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from fedit.client.batching import collate
from fedit.config import ModelConfig
from fedit.data.readers import read_records
from fedit.data.tokenize import tokenize_records
from fedit.eval.loss import heldout_loss
from fedit.models.loading import load_model, load_tokenizer
from fedit.seeding import Stream, derive_seed
from fedit.server.selection import select_clients

W1_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "w1"
SEED, BATCH, LR, CUTOFF = 42, 8, 1.5e-4, 256


def load_w1(data_dir: Path, tokenizer):
    """Tokenised examples per client (local_training_<k>.json, natural order) and held out."""
    files = sorted(
        data_dir.glob("local_training_*.json"), key=lambda p: int(re.findall(r"\d+", p.name)[-1])
    )

    def tokenize(path: Path):
        return tokenize_records(read_records(str(path)), tokenizer, "alpaca", CUTOFF)[0]

    return [tokenize(f) for f in files], tokenize(data_dir / "global_test.json")


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_adapter(model, state: dict[str, torch.Tensor]) -> None:
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.copy_(state[name])


def fedavg(states: list[dict], weights: list[int]) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {
        k: sum(s[k] * (w / total) for s, w in zip(states, weights, strict=True)) for k in states[0]
    }


def train_client(model, examples, steps: int, seed: int, pad_id: int, stats: dict) -> None:
    """One local epoch (or `steps` batches) of AdamW over random batches of 8."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    torch.manual_seed(seed)  # LoRA dropout masks, so a rerun draws the same ones
    model.train()
    for step in range(steps):
        started = time.perf_counter()
        rows = [examples[order[(step * BATCH + j) % len(order)]] for j in range(BATCH)]
        batch = collate([(e.input_ids, e.labels) for e in rows], pad_id, torch.device("cpu"))
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()  # mean over label tokens; logits at every position
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        stats["step_seconds"] += time.perf_counter() - started
        stats["label_tokens"] += int((batch["labels"][:, 1:] != -100).sum())
        stats["real_tokens"] += int(batch["attention_mask"].sum())
        stats["computed_tokens"] += batch["input_ids"].numel()


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = load_tokenizer(ModelConfig())
    clients, heldout = load_w1(Path(args.data_dir), tokenizer)
    torch.manual_seed(SEED)  # the same LoRA A initialisation as fedit's attach_lora
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=["q_proj", "v_proj"],
    )
    model = get_peft_model(load_model(ModelConfig(dtype="float32")), lora)
    global_state = adapter_state(model)
    stats = {"step_seconds": 0.0, "label_tokens": 0, "real_tokens": 0, "computed_tokens": 0}
    round_seconds = []
    for r in range(args.rounds):
        round_started = time.perf_counter()
        states, weights = [], []
        for k in select_clients(len(clients), args.clients_per_round, None, SEED, r):
            load_adapter(model, global_state)
            steps = args.steps or math.ceil(len(clients[k]) / BATCH)
            train_client(
                model,
                clients[k],
                steps,
                derive_seed(SEED, Stream.CLIENT_DATA, r, k),
                tokenizer.pad_token_id,
                stats,
            )
            states.append(adapter_state(model))
            weights.append(len(clients[k]))
        global_state = fedavg(states, weights)
        load_adapter(model, global_state)
        model.save_pretrained(Path(args.output_dir) / f"round_{r + 1:04d}")
        round_seconds.append(time.perf_counter() - round_started)
    wall = time.perf_counter() - started
    eval_started = time.perf_counter()
    loss = heldout_loss(model, heldout, tokenizer.pad_token_id, batch_size=8)["overall"]["loss"]
    return {
        "wall_seconds": wall,
        "eval_seconds": time.perf_counter() - eval_started,
        "round_seconds": round_seconds,
        **stats,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "heldout_loss": loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True, help="where round adapters are written")
    parser.add_argument("--data-dir", default=str(W1_DIR))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients-per-round", type=int, default=2)
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per client (default: 1 epoch)"
    )
    print(json.dumps(run(parser.parse_args())))


if __name__ == "__main__":
    main()
