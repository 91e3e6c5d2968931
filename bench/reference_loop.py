"""A plain-PyTorch federated loop doing the W1 (or W0) work the way the reference codes do it.

This is the yardstick `bench/w1.py` and `bench/w0.py` compare fedit against, not a second
fedit. It runs W1 (../shared/data/README.md), or with `--w0 DIR` W0 on the tiny model and
records bench/w0.py prepared in DIR (W0's clients as fedit partitions them; no held-out
set, so no evaluation), with fedit's model loading, tokenisation and client selection,
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
import time
from pathlib import Path

import torch
from harness import peak_rss_kib
from peft import LoraConfig, get_peft_model

from fedit.client.batching import collate
from fedit.config import ModelConfig
from fedit.data.readers import read_records
from fedit.data.tokenize import tokenize_records
from fedit.eval.loss import heldout_loss
from fedit.models.loading import load_model, load_tokenizer
from fedit.seeding import Stream, derive_seed

try:
    from fedit.fleet.selection import select_clients
except ImportError:  # fedit before issue 27's moves, as bench/before_after.py may measure it
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


def load_w0(workdir: Path, tokenizer):
    """W0's clients, partitioned by fedit from bench/configs/w0.toml (category shards, seed
    42) and tokenised as above; W0 holds no records out."""
    from w0 import w0_config

    from fedit.data.prepare import prepare_records

    prepared = prepare_records(w0_config(workdir))

    def tokenize(part: list[int]):
        return tokenize_records([prepared.train[i] for i in part], tokenizer, "alpaca", CUTOFF)[0]

    return [tokenize(part) for part in prepared.parts], []


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


def batch_rows(order: list[int], step: int, epoch: bool) -> list[int]:
    """Step `step`'s rows: one epoch ends with a partial batch (each record once, as
    fedit's epoch does; W1's 40-record clients never have one), `steps` batches wrap."""
    if epoch:
        return order[step * BATCH : (step + 1) * BATCH]
    return [order[(step * BATCH + j) % len(order)] for j in range(BATCH)]


def train_client(model, examples, steps: int | None, seed: int, pad_id: int, stats: dict) -> None:
    """One local epoch (`steps` None) or `steps` batches of AdamW over random batches of 8."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    torch.manual_seed(seed)  # LoRA dropout masks, so a rerun draws the same ones
    model.train()
    for step in range(steps or math.ceil(len(examples) / BATCH)):
        started = time.perf_counter()
        rows = [examples[i] for i in batch_rows(order, step, epoch=steps is None)]
        batch = collate([(e.input_ids, e.labels) for e in rows], pad_id, torch.device("cpu"))
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()  # mean over label tokens; logits at every position
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        stats["step_seconds"] += time.perf_counter() - started
        stats["optimizer_steps"] += 1
        stats["label_tokens"] += int((batch["labels"][:, 1:] != -100).sum())
        stats["real_tokens"] += int(batch["attention_mask"].sum())
        stats["computed_tokens"] += batch["input_ids"].numel()


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.w0:
        model_cfg = ModelConfig(name_or_path=str(Path(args.w0) / "model"), dtype="float32")
        tokenizer = load_tokenizer(model_cfg)
        clients, heldout = load_w0(Path(args.w0), tokenizer)
    else:
        model_cfg = ModelConfig(dtype="float32")
        tokenizer = load_tokenizer(model_cfg)
        clients, heldout = load_w1(Path(args.data_dir), tokenizer)
    torch.manual_seed(SEED)  # the same LoRA A initialisation as fedit's attach_lora
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=["q_proj", "v_proj"],
    )
    model = get_peft_model(load_model(model_cfg), lora)
    global_state = adapter_state(model)
    stats = {"step_seconds": 0.0, "label_tokens": 0, "real_tokens": 0, "computed_tokens": 0}
    stats |= {"client_rounds": 0, "optimizer_steps": 0}
    round_seconds = []
    for r in range(args.rounds):
        round_started = time.perf_counter()
        states, weights = [], []
        for k in select_clients(len(clients), args.clients_per_round, None, SEED, r):
            load_adapter(model, global_state)
            train_client(
                model,
                clients[k],
                args.steps,
                derive_seed(SEED, Stream.CLIENT_DATA, r, k),
                tokenizer.pad_token_id,
                stats,
            )
            stats["client_rounds"] += 1
            states.append(adapter_state(model))
            weights.append(len(clients[k]))
        global_state = fedavg(states, weights)
        load_adapter(model, global_state)
        model.save_pretrained(Path(args.output_dir) / f"round_{r + 1:04d}")
        round_seconds.append(time.perf_counter() - round_started)
    wall = time.perf_counter() - started
    eval_started = time.perf_counter()
    loss = None
    if heldout:
        scores = heldout_loss(model, heldout, tokenizer.pad_token_id, batch_size=8)
        loss = scores["overall"]["loss"]
    return {
        "wall_seconds": wall,
        "eval_seconds": time.perf_counter() - eval_started,
        "rounds": len(round_seconds),
        "round_seconds": round_seconds,
        **stats,
        "peak_rss_kib": peak_rss_kib(),
        "heldout_loss": loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True, help="where round adapters are written")
    parser.add_argument("--data-dir", default=str(W1_DIR))
    parser.add_argument("--w0", help="run W0 from this bench/w0.py directory instead of W1")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients-per-round", type=int, default=2)
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per client (default: 1 epoch)"
    )
    print(json.dumps(run(parser.parse_args())))


if __name__ == "__main__":
    main()
