"""Where a training step's time goes: torch.profiler over fedit's trainer on W1's first client.

Runs bench/configs/w1.toml's training (fedit's defaults: LoRA r=8 on q_proj,v_proj, batch
8) for a few steps after one warm-up step, under torch.profiler, and prints the operators
that take the most self CPU time, with their share of the profiled steps, so that a
speed-up goes after what the profile shows. `--set` overrides the config (e.g.
`--set lora.dropout=0.0` to see what LoRA dropout costs).

    .venv/bin/python bench/profile_steps.py
    .venv/bin/python bench/profile_steps.py --steps 3 --set lora.dropout=0.0

Prints a markdown table; raw results go to bench/results/profile-<UTC time>.json.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from harness import (
    machine_info,
    markdown_table,
    publish,
    warm_w1_trainer,
    warn_if_busy,
)
from torch.profiler import ProfilerActivity, profile

from fedit.client.trainer import train_client


def profiled_steps(steps: int, overrides: list[str]) -> tuple[list[dict], float]:
    """Top operators by self CPU time over `steps` trainer steps, and the steps' seconds."""
    cfg, model, examples, kwargs = warm_w1_trainer(overrides)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        update = train_client(
            model, examples, replace(cfg.train, max_steps=steps), seed=1, **kwargs
        )
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:20]
    rows = [
        {
            "op": e.key,
            "calls": e.count,
            "self_seconds": e.self_cpu_time_total / 1e6,
            "share": e.self_cpu_time_total / total,
        }
        for e in top
    ]
    return rows, update.metrics["step_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="profiled training steps")
    parser.add_argument("--set", action="append", default=[], help="config override")
    args = parser.parse_args()
    warn_if_busy()
    rows, seconds = profiled_steps(args.steps, args.set)
    payload = {"machine": machine_info(), "args": vars(args), "step_seconds": seconds}
    print(f"{args.steps} steps, {seconds:.1f} s inside steps (under the profiler)\n")
    table = [
        [r["op"], str(r["calls"]), f"{r['self_seconds']:.2f}", f"{r['share']:.1%}"] for r in rows
    ]
    header = ["operator", "calls", "self s", "share"]
    publish("profile", payload | {"top_ops": rows}, markdown_table(header, table))


if __name__ == "__main__":
    main()
