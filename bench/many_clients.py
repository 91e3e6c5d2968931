"""Many clients: peak RSS, seconds per round and bytes written for 10 to 10,000 clients.

A cross-device federation has thousands of clients and samples a few per round. What
decides whether such a run fits is what the framework keeps per client: per-client state
(SCAFFOLD's control variates c_k, error-feedback memories, FedSA-LoRA's own B factors),
tokenised records, per-round files. This script trains the same rounds (5 clients per
round, 2 optimizer steps each, so every round does the same work) on W0's tiny model (a
random 2-layer Llama, hidden 64, SmolLM2's tokenizer) for N = 10, 100, 1,000 and 10,000
clients, each N in its own process (its own peak RSS), with two setups that keep state per
client:

  scaffold-int8   SCAFFOLD with int8 uploads and error feedback (c_k on the server side,
                  a memory on each client's side)
  fedsa           FedAvg of the A factors with FedSA-LoRA (lora.shared = "A"; each
                  client keeps its own B)

The data is the same for every N: the Dolly records whose alpaca prompt takes at most 192
tokens (so that each keeps response tokens at max_seq_len 256 and even a one-record
client can train; the count is in the results), split IID (every client gets at least
one record). LoRA r=8 on q_proj,v_proj as in W0, fp32.

    .venv/bin/python bench/many_clients.py                  # all four N, both setups
    .venv/bin/python bench/many_clients.py --clients 10,1000 --setups fedsa --rounds 3

Prints a markdown table to stdout; raw results go to bench/results/many_clients-<UTC>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

from harness import (
    dir_usage,
    machine_info,
    markdown_table,
    peak_rss_kib,
    publish,
    run_child,
    warn_if_busy,
)
from w0 import DOLLY, w0_config, write_tiny_model

MAX_PROMPT_TOKENS = 192  # of max_seq_len 256: a response token is always left
SETUPS = {
    "scaffold-int8": {"strategy.name": "scaffold", "compression.upload": "int8"},
    "fedsa": {"lora.shared": "A"},
}


def write_short_records(path: Path) -> int:
    """Dolly's records whose alpaca prompt takes at most MAX_PROMPT_TOKENS; how many."""
    from fedit.config import ModelConfig
    from fedit.data.readers import read_records, write_records_jsonl
    from fedit.data.tokenize import tokenize_prompts
    from fedit.models.loading import load_tokenizer

    records = read_records(str(DOLLY))
    prompts = tokenize_prompts(records, load_tokenizer(ModelConfig()), "alpaca")
    short = [r for r, p in zip(records, prompts, strict=True) if len(p) <= MAX_PROMPT_TOKENS]
    write_records_jsonl(short, path)
    return len(short)


# --- child: one (setup, N) run -------------------------------------------------------------


def run_fedit(workdir: Path, setup: str, num_clients: int, rounds: int) -> dict:
    from fedit.engine.simulation import Simulation

    extra = {
        **SETUPS[setup],
        "partition.method": "iid",
        "partition.num_clients": num_clients,
        "train.max_steps": 2,
        "train.micro_batch_size": 1,  # a one-record client fills its batch too
        "train.grad_accum_steps": 1,
    }
    cfg = w0_config(workdir, rounds, clients_per_round=5, extra=extra)
    started = time.perf_counter()
    Simulation(cfg, show_progress=False).run()
    wall = time.perf_counter() - started
    text = (workdir / "run" / "metrics.jsonl").read_text()
    lines = [line for line in map(json.loads, text.splitlines()) if line["round"]]
    seconds = [line["seconds"] for line in lines]
    return {
        "wall_seconds": wall,
        "round_seconds": seconds,
        "real_tokens": sum(c["real_tokens"] for line in lines for c in line["clients"]),
        # everything before round 1: tokeniser, data, partition, model, clients
        "setup_seconds": wall - sum(seconds),
        "peak_rss_kib": peak_rss_kib(),
    }


# --- parent ---------------------------------------------------------------------------------


def run_one(workdir: Path, setup: str, num_clients: int, rounds: int) -> dict:
    command = ["bench/many_clients.py", "--child", str(workdir), "--setups", setup]
    command += ["--clients", str(num_clients), "--rounds", str(rounds)]
    result = run_child(command)
    result["files_written"], result["bytes_written"] = dir_usage(workdir / "run")
    checkpoint = workdir / "run" / f"round_{rounds:04d}"
    result["checkpoint_bytes"] = dir_usage(checkpoint)[1]
    shutil.rmtree(workdir / "run")
    # round 1 also builds what is made once (the run header, the first state files)
    result["seconds_per_round"] = mean(result["round_seconds"][1:] or result["round_seconds"])
    return result


def table(results: dict[str, dict[int, dict]]) -> str:
    rows = []
    for setup, by_n in results.items():
        smallest = by_n[min(by_n)]
        for n, r in by_n.items():
            rows.append([
                setup, f"{n:,}", f"{r['peak_rss_kib'] / 1024:.0f}",
                f"{r['peak_rss_kib'] / smallest['peak_rss_kib']:.2f}",
                f"{r['seconds_per_round']:.2f}",
                f"{r['real_tokens'] / len(r['round_seconds']):.0f}",
                f"{r['setup_seconds']:.1f}",
                f"{r['files_written']:,}", f"{r['bytes_written'] / 1e6:.2f}",
                f"{r['checkpoint_bytes'] / 1e3:.0f}",
            ])  # fmt: skip
    header = [
        "setup", "clients", "peak RSS MiB", "RSS / fewest", "s/round (rounds 2..)",
        "tokens/round", "setup s", "files written", "MB written", "last checkpoint kB",
    ]  # fmt: skip
    return markdown_table(header, rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="fedit with 10 to 10,000 clients.")
    parser.add_argument("--clients", default="10,100,1000,10000", help="comma-separated N")
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated subset")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # prepared workdir
    args = parser.parse_args()
    args.clients = [int(n) for n in args.clients.split(",")]
    args.setups = args.setups.split(",")
    if unknown := set(args.setups) - SETUPS.keys():
        parser.error(f"unknown setups {sorted(unknown)}; known: {', '.join(SETUPS)}")
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        setup, (n,) = args.setups[0], args.clients
        print(json.dumps(run_fedit(args.child, setup, n, args.rounds)))
        return
    warn_if_busy()
    machine = machine_info()
    workdir = Path(tempfile.mkdtemp(prefix="fedit-many-"))
    results: dict[str, dict[int, dict]] = {}
    try:
        write_tiny_model(workdir / "model")
        records = write_short_records(workdir / "records.jsonl")
        for setup in args.setups:
            for n in args.clients:
                print(f"running {setup} with {n:,} clients ...", file=sys.stderr, flush=True)
                results.setdefault(setup, {})[n] = run_one(workdir, setup, n, args.rounds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    payload = {
        "workload": "many clients",
        "machine": machine,
        "args": vars(args) | {"records": records},
        "results": results,
    }
    publish("many_clients", payload, table(results))


if __name__ == "__main__":
    main()
