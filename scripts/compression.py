"""Compressed uploads on one task: each codec's bytes per client-round and its held-out loss
and quality against float32 uploads, on the same federation.

    .venv/bin/python scripts/compression.py -c configs/demo.toml [--set key=value ...]

Bytes are metrics.jsonl's bytes_up (what the encoded reply puts on the wire, serialised as
Flower pushes it), averaged over every client-round. Runs go to
<output_dir>-compression/<codec>/, the table to <output_dir>-compression/compression.md;
runs already complete are scored again, not retrained.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from experiment_cli import experiment_config

from fedit.config import CompressionConfig, RunConfig
from fedit.engine.simulation import console
from fedit.experiments.compare import compare_configs, generation_metric

# name -> [compression] settings; top-k with and without error feedback
CODECS: dict[str, dict] = {
    "float32": {},
    "bf16": {"upload": "bf16"},
    "int8": {"upload": "int8"},
    "topk-0.1": {"upload": "topk", "topk_fraction": 0.1},
    "topk-0.1-no-feedback": {"upload": "topk", "topk_fraction": 0.1, "error_feedback": False},
}


def mean_bytes_up(run_dir: Path) -> float:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sent = [c["bytes_up"] for line in lines if line["round"] > 0 for c in line["clients"]]
    return sum(sent) / len(sent)


def table(cfg: RunConfig, results: dict[str, dict], out_dir: Path) -> str:
    metric = generation_metric(cfg)
    reference_bytes = mean_bytes_up(out_dir / "float32")
    reference_loss = results["float32"]["loss"]["mean"]
    rows = [
        f"| upload | bytes up per client-round | fewer bytes | held-out loss | loss change "
        f"| mean {metric.replace('_', ' ')} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, scores in results.items():
        sent, loss = mean_bytes_up(out_dir / name), scores["loss"]["mean"]
        rows.append(
            f"| {name} | {sent:,.0f} | {reference_bytes / sent:.2f}× | {loss:.4f} "
            f"| {100 * (loss - reference_loss) / reference_loss:+.2f}% "
            f"| {scores[metric]['mean']:.2f} |"
        )
    return "\n".join(rows) + "\n"


def main() -> None:
    cfg, out_dir = experiment_config(__doc__, "compression")
    named: dict[str, RunConfig | None] = {
        name: replace(
            cfg, compression=CompressionConfig(**settings), output_dir=str(out_dir / name)
        ).validate()
        for name, settings in CODECS.items()
    }
    results = compare_configs(cfg, named, out_dir)
    text = table(cfg, results, out_dir)
    (out_dir / "compression.md").write_text(text)
    console.print(text)


if __name__ == "__main__":
    main()
