"""Mixed LoRA ranks on one task: clients at ranks {4, 8, 16} in one federation against
every client at 8 and every client at 16, by quality and by bytes per round.

    .venv/bin/python scripts/ranks.py -c configs/demo.toml [--set key=value ...]

Every run keeps the config's LoRA scaling s = alpha / r (alpha scaled with r), so a
component weighs the same at every rank. Mixed: 30% of the clients at rank 4, 40% at 8,
30% at 16 (placed by the run seed) under a rank-16 global adapter, aggregated with
zero padding (HetLoRA) and with per-component holders' means. Bytes are metrics.jsonl's,
summed over each round's clients and averaged over the rounds. Runs go to
<output_dir>-ranks/<name>/, the table to <output_dir>-ranks/ranks.md.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from experiment_cli import experiment_config

from fedit.config import RunConfig
from fedit.engine.simulation import console
from fedit.experiments.compare import compare_configs, generation_metric

TIERS = {"rank_tiers": [4, 8, 16], "tier_shares": [0.3, 0.4, 0.3]}
RUNS: dict[str, tuple[int, dict, str]] = {  # name -> (global rank, [lora] extras, aggregation)
    "all-8": (8, {}, "zero_pad"),
    "all-16": (16, {}, "zero_pad"),
    "mixed-zero-pad": (16, TIERS, "zero_pad"),
    "mixed-holders": (16, TIERS, "holders"),
}


def run_config(cfg: RunConfig, out_dir: Path, name: str) -> RunConfig:
    rank, extras, aggregation = RUNS[name]
    scaling = cfg.lora.alpha / cfg.lora.r
    lora = replace(cfg.lora, r=rank, alpha=round(scaling * rank), **extras)
    strategy = replace(cfg.strategy, rank_aggregation=aggregation)
    return replace(cfg, lora=lora, strategy=strategy, output_dir=str(out_dir / name)).validate()


def bytes_per_round(run_dir: Path) -> tuple[float, float]:
    """(down, up): each round's bytes summed over its clients, averaged over the rounds."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [line for line in lines if line["round"] > 0]
    down = sum(c["bytes_down"] for line in rounds for c in line["clients"]) / len(rounds)
    up = sum(c["bytes_up"] for line in rounds for c in line["clients"]) / len(rounds)
    return down, up


def table(cfg: RunConfig, results: dict[str, dict], out_dir: Path) -> str:
    metric = generation_metric(cfg)
    rows = [
        f"| run | mean {metric.replace('_', ' ')} | held-out loss | bytes down per round "
        "| bytes up per round |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, scores in results.items():
        down, up = bytes_per_round(out_dir / name)
        rows.append(
            f"| {name} | {scores[metric]['mean']:.2f} | {scores['loss']['mean']:.4f} "
            f"| {down:,.0f} | {up:,.0f} |"
        )
    return "\n".join(rows) + "\n"


def main() -> None:
    cfg, out_dir = experiment_config(__doc__, "ranks")
    named: dict[str, RunConfig | None] = {name: run_config(cfg, out_dir, name) for name in RUNS}
    results = compare_configs(cfg, named, out_dir)
    text = table(cfg, results, out_dir)
    (out_dir / "ranks.md").write_text(text)
    console.print(text)


if __name__ == "__main__":
    main()
