"""W0 benchmark: fedit's framework overhead on the FedIT paper's federation shape, beside a
plain PyTorch loop doing the same client-rounds.

W0 (../shared/data/README.md) is 100 clients (category shards, seed 42) of the first
2,000 Dolly records, 20 rounds x 5 clients x 1 local epoch of batch 8, fp32, LoRA r8 on
q_proj,v_proj, on a random 2-layer Llama (hidden 64) with SmolLM2's tokenizer and 49,152-
token vocabulary. The model is so small that the time outside optimizer steps (data
prep, model load, adapter swaps, aggregation, checkpoints) is what the run measures.

The script writes the tiny model (with the embedded SmolLM2 tokenizer) and the 2,000
records to a temporary directory, then runs, back to back and each in its own process
(its own peak RSS), bench/configs/w0.toml in fedit (its defaults) and
bench/reference_loop.py --w0 (the plain loop: same model, clients, sampled clients and
steps), and reports for each wall time, time inside and outside optimizer steps (in all
and per client-round), computed vs real tokens, files and bytes written, and peak RSS,
with fedit / plain-loop ratios.

    .venv/bin/python bench/w0.py            # full W0 (a few minutes on 2 cores)
    .venv/bin/python bench/w0.py --quick    # smoke run: 2 rounds x 2 clients
    .venv/bin/python bench/w0.py --src ../other/src   # fedit imported from another tree

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
    publish,
    run_child,
    warn_if_busy,
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


def w0_config(
    workdir: Path,
    rounds: int | None = None,
    clients_per_round: int | None = None,
    extra: dict | None = None,
):
    """bench/configs/w0.toml on the model and records prepared in `workdir`, with `extra`
    overrides."""
    from fedit.config import load_config

    values = {
        **(extra or {}),
        "output_dir": str(workdir / "run"),
        "model.name_or_path": str(workdir / "model"),
        "data.path": str(workdir / "records.jsonl"),
        "train.threads": os.cpu_count(),
    }
    if rounds:
        values |= {"federation.rounds": rounds, "eval.every_rounds": rounds}
    if clients_per_round:
        values["federation.clients_per_round"] = clients_per_round
    return load_config(CONFIG, [f"{k}={json.dumps(v)}" for k, v in values.items()])


def run_fedit(workdir: Path, rounds: int | None, clients_per_round: int | None) -> dict:
    from fedit.engine.simulation import Simulation

    cfg = w0_config(workdir, rounds, clients_per_round)
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


def fedit_command(workdir: Path, rounds: int | None, clients_per_round: int | None) -> list[str]:
    """The child that runs W0 in fedit on the model and records prepared in `workdir`."""
    scale = []
    for flag, value in (("--rounds", rounds), ("--clients-per-round", clients_per_round)):
        if value:
            scale += [flag, str(value)]
    return ["bench/w0.py", "--child", str(workdir), *scale]


def measure(command: list[str], workdir: Path, src: str | Path | None = None) -> dict:
    """One child's result with what its run left on disk (then deleted) and the derived
    figures; `src`: the source tree it imports fedit from (run_child)."""
    result = run_child(command, src)
    result["files_written"], result["bytes_written"] = dir_usage(workdir / "run")
    shutil.rmtree(workdir / "run")
    return result | derived(result)


def derived(r: dict) -> dict:
    outside = r["wall_seconds"] - r["step_seconds"]
    return {
        "outside_steps_seconds": outside,
        "outside_steps_share": outside / r["wall_seconds"],
        "inside_per_client_round": r["step_seconds"] / r["client_rounds"],
        "outside_ms_per_client_round": 1000 * outside / r["client_rounds"],
        "padding_share": 1 - r["real_tokens"] / r["computed_tokens"],
        "peak_rss_mib": r["peak_rss_kib"] / 1024,
    }


ROWS = [  # (label, key, format)
    ("wall s", "wall_seconds", "{:.1f}"),
    ("rounds", "rounds", "{}"),
    ("client-rounds", "client_rounds", "{}"),
    ("optimizer steps", "optimizer_steps", "{}"),
    ("inside optimizer steps s", "step_seconds", "{:.1f}"),
    ("inside steps s per client-round", "inside_per_client_round", "{:.3f}"),
    ("outside optimizer steps s", "outside_steps_seconds", "{:.1f}"),
    ("outside steps share of wall", "outside_steps_share", "{:.0%}"),
    ("outside steps ms per client-round", "outside_ms_per_client_round", "{:.1f}"),
    ("computed tokens", "computed_tokens", "{:,}"),
    ("real (non-pad) tokens", "real_tokens", "{:,}"),
    ("label tokens", "label_tokens", "{:,}"),
    ("padding share of computed", "padding_share", "{:.1%}"),
    ("files written", "files_written", "{:,}"),
    ("bytes written", "bytes_written", "{:,}"),
    ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
]


def table(results: dict[str, dict]) -> str:
    fedit, plain = results["fedit"], results["plain loop"]
    rows = []
    for label, key, fmt in ROWS:
        ratio = f"{fedit[key] / plain[key]:.2f}" if plain[key] else "-"
        rows.append([label, fmt.format(fedit[key]), fmt.format(plain[key]), ratio])
    return markdown_table(["W0", "fedit", "plain loop", "fedit / plain"], rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="W0: fedit's framework overhead.")
    parser.add_argument("--rounds", type=int, help="override federation rounds (W0: 20)")
    parser.add_argument("--clients-per-round", type=int, help="override (W0: 5)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds x 2 clients")
    parser.add_argument("--src", help="import fedit from this src/ (default: the installed)")
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
    machine = machine_info()
    workdir = Path(tempfile.mkdtemp(prefix="fedit-w0-"))
    commands = {
        "fedit": fedit_command(workdir, args.rounds, args.clients_per_round),
        "plain loop": [
            "bench/reference_loop.py", "--w0", str(workdir), "--output-dir", str(workdir / "run"),
            "--rounds", str(args.rounds or 20), "--clients-per-round",
            str(args.clients_per_round or 5),
        ],
    }  # fmt: skip
    results = {}
    try:
        write_tiny_model(workdir / "model")
        write_first_records(workdir / "records.jsonl")
        for name, command in commands.items():  # back to back, each in its own process
            print(f"running W0: {name} ...", file=sys.stderr, flush=True)
            results[name] = measure(command, workdir, args.src)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    payload = {"workload": "W0", "machine": machine, "args": vars(args), "results": results}
    publish("w0", payload, table(results))


if __name__ == "__main__":
    main()
