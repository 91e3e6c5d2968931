"""W1 benchmark: fedit against a plain-PyTorch reference loop, each optimisation on and off.

Runs, back to back and each in its own process (so each has its own peak RSS), the W1
workload of ../shared/data/README.md as:
  reference      bench/reference_loop.py: the reference codes' way (padding to the batch's
                 longest row, LM head over every position, fp32)
  fedit-off      fedit with group_by_length, logits_on_labels_only and mixed precision off
  fedit-group    ... with only length-grouped batching on
  fedit-labels   ... with only the LM head on label positions on
  fedit-amp      ... with only mixed_precision = "auto" (bf16 autocast on CPUs with native bf16)
  fedit-amp-cast ... fedit-amp with frozen weights kept in bf16 for each round
                 (half_precision_frozen_weights: one cast per round instead of per forward)
  fedit-cap      ... with only max_tokens_per_forward = 1024 (long batches split in forwards)
  fedit-mask     ... with only lora.dropout_mask = "per_input" (one LoRA dropout mask per
                 input tensor: q_proj and v_proj share theirs; fedit.models.lora_dropout)
  fedit-all      fedit's defaults (all of the above on but the mask and eager) plus
                 max_tokens_per_forward = 1024
  fedit-all-mask ... fedit-all with lora.dropout_mask = "per_input"
  fedit-eager    ... fedit-off with only model.attn_implementation = "eager" (transformers'
                 matmul-and-softmax attention instead of SDPA)
  fedit-all-eager ... fedit-all with model.attn_implementation = "eager"
fedit variants use bench/configs/w1.toml; every variant uses all cores.

Per variant: wall time (model load, data prep, training, checkpoints; without the final
held-out evaluation, which is timed apart), seconds per round, time outside optimizer
steps (wall - sum of step seconds) and its share, label and real (non-pad) tokens per
wall second, padding share of computed tokens, peak RSS, bytes written, held-out loss;
ratios against the reference (wall, RSS) and fedit-off (held-out loss).

    .venv/bin/python bench/w1.py                 # full W1, ~40 min on a quiet 2-core machine
    .venv/bin/python bench/w1.py --quick         # smoke run: 1 round, 1 client, 1 step
    .venv/bin/python bench/w1.py --variants reference,fedit-all --rounds 2
    .venv/bin/python bench/w1.py --src ../other/src   # fedit imported from another tree

Prints a markdown table to stdout; raw results go to bench/results/w1-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

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

CONFIG = REPO / "bench" / "configs" / "w1.toml"
TOKEN_CAP = 1024  # padded tokens per forward for the -cap and -all variants (W1 batches reach 2048)
OFF = {
    "train.group_by_length": False,
    "train.logits_on_labels_only": False,
    "train.mixed_precision": "off",
    "train.half_precision_frozen_weights": False,
}
VARIANTS: dict[str, dict | None] = {
    "reference": None,
    "fedit-off": OFF,
    "fedit-group": {**OFF, "train.group_by_length": True},
    "fedit-labels": {**OFF, "train.logits_on_labels_only": True},
    "fedit-amp": {**OFF, "train.mixed_precision": "auto"},
    "fedit-amp-cast": {
        **OFF,
        "train.mixed_precision": "auto",
        "train.half_precision_frozen_weights": True,
    },
    "fedit-cap": {**OFF, "train.max_tokens_per_forward": TOKEN_CAP},
    "fedit-mask": {**OFF, "lora.dropout_mask": "per_input"},
    "fedit-all": {"train.max_tokens_per_forward": TOKEN_CAP},
    "fedit-all-mask": {"train.max_tokens_per_forward": TOKEN_CAP, "lora.dropout_mask": "per_input"},
    "fedit-eager": {**OFF, "model.attn_implementation": "eager"},
    "fedit-all-eager": {
        "train.max_tokens_per_forward": TOKEN_CAP,
        "model.attn_implementation": "eager",
    },
}
TOKEN_KEYS = ("step_seconds", "label_tokens", "real_tokens", "computed_tokens")


# --- child: one fedit variant -------------------------------------------------------------


def fedit_overrides(args: argparse.Namespace, output_dir: str) -> list[str]:
    values = {**VARIANTS[args.child], "output_dir": output_dir, "train.threads": os.cpu_count()}
    if args.rounds:
        values |= {"federation.rounds": args.rounds, "eval.every_rounds": args.rounds}
    if args.clients_per_round:
        values["federation.clients_per_round"] = args.clients_per_round
    if args.steps:
        values["train.max_steps"] = args.steps
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def time_checkpoints(rounds) -> list[float]:
    """Seconds of each checkpoint write: a round's metrics "seconds" stop before it."""
    seconds: list[float] = []
    save = rounds.save_checkpoint

    def timed_save(*args, **kwargs):
        started = time.perf_counter()
        result = save(*args, **kwargs)
        seconds.append(time.perf_counter() - started)
        return result

    rounds.save_checkpoint = timed_save  # the name engine.rounds calls
    return seconds


def run_fedit(args: argparse.Namespace) -> dict:
    from fedit.config import load_config
    from fedit.engine import rounds, simulation

    checkpoint_seconds = time_checkpoints(rounds)
    cfg = load_config(CONFIG, fedit_overrides(args, args.output_dir))
    started = time.perf_counter()
    simulation.Simulation(cfg, show_progress=False).run()
    elapsed = time.perf_counter() - started
    text = (Path(args.output_dir) / "metrics.jsonl").read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # eval.at_start is off: rounds 1..
    clients = [c for line in lines for c in line["clients"]]
    evals = [line.get("eval_seconds", 0.0) for line in lines]
    return {
        "wall_seconds": elapsed - sum(evals),
        "eval_seconds": sum(evals),
        "round_seconds": [
            line["seconds"] - ev + ck
            for line, ev, ck in zip(lines, evals, checkpoint_seconds, strict=True)
        ],
        **{k: sum(c[k] for c in clients) for k in TOKEN_KEYS},
        "peak_rss_kib": peak_rss_kib(),
        "heldout_loss": lines[-1]["heldout"]["overall"]["loss"],
    }


# --- parent: run the variants, summarise ----------------------------------------------------


def variant_command(name: str, args: argparse.Namespace, output_dir: Path) -> list[str]:
    scale = []
    for flag in ("rounds", "clients_per_round", "steps"):
        if getattr(args, flag):
            scale += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if name == "reference":
        return ["bench/reference_loop.py", "--output-dir", str(output_dir), *scale]
    return ["bench/w1.py", "--child", name, "--output-dir", str(output_dir), *scale]


def run_variant(name: str, args: argparse.Namespace) -> dict:
    """One variant in its own process, fedit imported from args.src (None: the installed
    one); {"error": ...} where it failed."""
    workdir = Path(tempfile.mkdtemp(prefix=f"fedit-w1-{name}-"))
    try:
        result = run_child(variant_command(name, args, workdir / "run"), args.src)
        result["files_written"], result["bytes_written"] = dir_usage(workdir / "run")
        return result
    except RuntimeError as err:
        print(f"{name} failed: {err}", file=sys.stderr)
        return {"error": str(err)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def convert_embedded_model() -> None:
    """De-quantise the embedded GGUF now (cached), outside every variant's timing."""
    from fedit.config import ModelConfig
    from fedit.models.loading import model_source

    model_source(ModelConfig())


def derived(r: dict) -> dict:
    wall, steps = r["wall_seconds"], r["step_seconds"]
    return {
        "seconds_per_round": mean(r["round_seconds"]),
        "outside_steps_seconds": wall - steps,
        "outside_steps_share": (wall - steps) / wall,
        "label_tokens_per_second": r["label_tokens"] / wall,
        "real_tokens_per_second": r["real_tokens"] / wall,
        "padding_share": 1 - r["real_tokens"] / r["computed_tokens"],
    }


def ratio(results: dict, name: str, base: str, key: str) -> str:
    if base not in results or "error" in results[base]:
        return "-"
    return f"{results[name][key] / results[base][key]:.2f}"


def loss_change(results: dict, name: str) -> str:
    if "fedit-off" not in results or "error" in results["fedit-off"]:
        return "-"
    off = results["fedit-off"]["heldout_loss"]
    return f"{(results[name]['heldout_loss'] - off) / off:+.2%}"


HEADER = [
    "variant", "wall s", "s/round", "outside steps s (share)", "label tok/s", "real tok/s",
    "padding", "peak RSS MiB", "written MB", "eval s", "held-out loss",
    "wall / ref", "RSS / ref", "loss vs off",
]  # fmt: skip


def table_row(results: dict, name: str) -> list[str]:
    r = results[name]
    if "error" in r:
        return [name, "failed", *["-"] * (len(HEADER) - 2)]
    return [
        name,
        f"{r['wall_seconds']:.1f}",
        f"{r['seconds_per_round']:.1f}",
        f"{r['outside_steps_seconds']:.1f} ({r['outside_steps_share']:.0%})",
        f"{r['label_tokens_per_second']:.0f}",
        f"{r['real_tokens_per_second']:.0f}",
        f"{r['padding_share']:.0%}",
        f"{r['peak_rss_kib'] / 1024:.0f}",
        f"{r['bytes_written'] / 1e6:.2f}",
        f"{r['eval_seconds']:.1f}",
        f"{r['heldout_loss']:.4f}",
        ratio(results, name, "reference", "wall_seconds"),
        ratio(results, name, "reference", "peak_rss_kib"),
        loss_change(results, name),
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="W1: fedit vs a plain reference loop.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--rounds", type=int, help="override federation rounds (W1: 4)")
    parser.add_argument("--clients-per-round", type=int, help="override (W1: 2)")
    parser.add_argument("--steps", type=int, help="steps per client per round (W1: 1 epoch = 5)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1 client, 1 step")
    parser.add_argument("--src", help="import fedit from this src/ (default: the installed)")
    parser.add_argument("--child", choices=[v for v in VARIANTS if v != "reference"])
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.clients_per_round, args.steps = 1, 1, 1
    unknown = set(args.variants.split(",")) - VARIANTS.keys()
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(run_fedit(args)))
        return
    convert_embedded_model()
    warn_if_busy()
    machine = machine_info()
    results: dict[str, dict] = {}
    for name in args.variants.split(","):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_variant(name, args)
        if "error" not in results[name]:
            results[name] |= derived(results[name])
    payload = {"workload": "W1", "machine": machine, "args": vars(args), "variants": results}
    publish("w1", payload, markdown_table(HEADER, [table_row(results, name) for name in results]))


if __name__ == "__main__":
    main()
