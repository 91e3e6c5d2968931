"""W0 benchmark: fedit's framework overhead on the FedIT paper's federation shape.

W0 (../shared/data/README.md) is 100 clients (category shards, seed 42) of the first
2,000 Dolly records, 20 rounds x 5 clients x 1 local epoch of batch 8, fp32, LoRA r8 on
q_proj,v_proj, on a random 2-layer Llama (hidden 64) with SmolLM2's tokenizer and 49,152-
token vocabulary. The model is so small that the time outside optimizer steps (data
prep, model load, adapter swaps, aggregation, checkpoints) is what the run measures.

The script writes the tiny model (with the embedded SmolLM2 tokenizer) and the 2,000
records to a temporary directory, then runs bench/configs/w0.toml in a child process (its
own peak RSS) and reports wall time, time inside and outside optimizer steps (in all and
per client-round), computed vs real tokens, files and bytes written, and peak RSS.

    .venv/bin/python bench/w0.py            # full W0 (a few minutes on 2 cores)
    .venv/bin/python bench/w0.py --quick    # smoke run: 2 rounds x 2 clients

Prints a markdown table to stdout; raw results go to bench/results/w0-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from harness import (
    REPO,
    dir_usage,
    machine_info,
    markdown_table,
    peak_rss_kib,
    run_child,
    warn_if_busy,
    write_results,
)

CONFIG = REPO / "bench" / "configs" / "w0.toml"
DOLLY = REPO.parent / "shared" / "data" / "databricks-dolly-15k.jsonl"
NUM_RECORDS = 2000
TOTALS = ("step_seconds", "label_tokens", "real_tokens", "computed_tokens")


def write_tiny_model(directory: Path) -> None:
    """A random Llama (seed 0) with SmolLM2's tokenizer and vocabulary, as an HF directory."""
    from fedit.config import ModelConfig
    from fedit.models.loading import load_tokenizer
    from fedit.models.tiny import make_tiny_model

    make_tiny_model(directory, tokenizer=load_tokenizer(ModelConfig()))


def write_first_records(path: Path) -> None:
    """The first 2,000 records in file order (data.max_records would shuffle first)."""
    with DOLLY.open(encoding="utf-8") as src, path.open("w", encoding="utf-8") as dst:
        dst.writelines(itertools.islice((line for line in src if line.strip()), NUM_RECORDS))


# --- child: the fedit run -----------------------------------------------------------------


def run_fedit(workdir: Path, rounds: int | None, clients_per_round: int | None) -> dict:
    from fedit.config import load_config
    from fedit.engine.simulation import Simulation

    values = {
        "output_dir": str(workdir / "run"),
        "model.name_or_path": str(workdir / "model"),
        "data.path": str(workdir / "records.jsonl"),
        "train.threads": os.cpu_count(),
    }
    if rounds:
        values |= {"federation.rounds": rounds, "eval.every_rounds": rounds}
    if clients_per_round:
        values["federation.clients_per_round"] = clients_per_round
    cfg = load_config(CONFIG, [f"{k}={json.dumps(v)}" for k, v in values.items()])
    started = time.perf_counter()
    Simulation(cfg, show_progress=False).run()
    wall = time.perf_counter() - started
    text = (workdir / "run" / "metrics.jsonl").read_text()
    lines = [line for line in map(json.loads, text.splitlines()) if line["round"] >= 1]
    clients = [c for line in lines for c in line["clients"]]
    return {
        "wall_seconds": wall,
        "rounds": len(lines),
        "client_rounds": len(clients),
        "optimizer_steps": sum(c["steps"] for c in clients),
        **{k: sum(c[k] for c in clients) for k in TOTALS},
        "peak_rss_kib": peak_rss_kib(),
    }


# --- parent ---------------------------------------------------------------------------------


def derived(r: dict) -> dict:
    outside = r["wall_seconds"] - r["step_seconds"]
    return {
        "outside_steps_seconds": outside,
        "outside_steps_share": outside / r["wall_seconds"],
        "inside_per_client_round": r["step_seconds"] / r["client_rounds"],
        "outside_per_client_round": outside / r["client_rounds"],
        "padding_share": 1 - r["real_tokens"] / r["computed_tokens"],
    }


def table(r: dict) -> str:
    rows = [
        ["wall", f"{r['wall_seconds']:.1f} s"],
        ["rounds / client-rounds / steps", f"{r['rounds']} / {r['client_rounds']} / "
         f"{r['optimizer_steps']}"],
        ["inside optimizer steps", f"{r['step_seconds']:.1f} s "
         f"({r['inside_per_client_round']:.3f} s per client-round)"],
        ["outside optimizer steps", f"{r['outside_steps_seconds']:.1f} s "
         f"({r['outside_steps_share']:.0%} of wall; "
         f"{r['outside_per_client_round']:.3f} s per client-round)"],
        ["computed / real / label tokens", f"{r['computed_tokens']} / {r['real_tokens']} / "
         f"{r['label_tokens']} (padding {r['padding_share']:.1%})"],
        ["files / bytes written", f"{r['files_written']} / {r['bytes_written']:,}"],
        ["peak RSS", f"{r['peak_rss_kib'] / 1024:.0f} MiB"],
    ]  # fmt: skip
    return markdown_table(["W0", "value"], rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="W0: fedit's framework overhead.")
    parser.add_argument("--rounds", type=int, help="override federation rounds (W0: 20)")
    parser.add_argument("--clients-per-round", type=int, help="override (W0: 5)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds x 2 clients")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # prepared workdir
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.clients_per_round = 2, 2
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(run_fedit(args.child, args.rounds, args.clients_per_round)))
        return
    warn_if_busy()
    workdir = Path(tempfile.mkdtemp(prefix="fedit-w0-"))
    try:
        write_tiny_model(workdir / "model")
        write_first_records(workdir / "records.jsonl")
        command = ["bench/w0.py", "--child", str(workdir)]
        for flag in ("rounds", "clients_per_round"):
            if getattr(args, flag):
                command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        print("running W0 ...", file=sys.stderr, flush=True)
        result = run_child(command)
        result["files_written"], result["bytes_written"] = dir_usage(workdir / "run")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result |= derived(result)
    payload = {"workload": "W0", "machine": machine_info(), "args": vars(args), "result": result}
    path = write_results("w0", payload)
    print(table(result))
    print(f"\nraw results: {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
