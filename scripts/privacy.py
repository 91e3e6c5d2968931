"""Utility against client-level differential privacy on one task: FedAvg without DP (ε = ∞)
and central DP-FedAvg at target ε = 8, 3, 1, with the accountant's ε as each run printed it.

    .venv/bin/python scripts/privacy.py -c configs/demo.toml [--clip-norm 2] [--set key=value ...]

Every run uses uniform client weights (DP requires them, so the ε = ∞ reference does too)
and `privacy.reproducible_noise = true`, so the table can be re-run number for number: that
voids the guarantee against anyone holding the config (fine for an experiment, never for a
release). Results go to <output_dir>-privacy/privacy.md (+ the usual scores.md/json); each
run to <output_dir>-privacy/<name>/.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from fedit.config import PrivacyConfig, RunConfig, load_config
from fedit.engine.simulation import console
from fedit.experiments.compare import compare_configs, generation_metric

TARGET_EPSILONS = (8.0, 3.0, 1.0)


def private_config(cfg: RunConfig, out_dir: Path, name: str, privacy: PrivacyConfig) -> RunConfig:
    strategy = replace(cfg.strategy, weighting="uniform")
    out = str(out_dir / name)
    return replace(cfg, strategy=strategy, privacy=privacy, output_dir=out).validate()


def last_privacy_record(run_dir: Path) -> dict | None:
    """The "privacy" entry of the run's last metrics line: ε after the last round."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]).get("privacy") if lines else None


def privacy_table(cfg: RunConfig, results: dict[str, dict], out_dir: Path) -> str:
    metric = generation_metric(cfg)
    rows = [
        f"| model | ε (accountant) | δ | σ | C | mean {metric.replace('_', ' ')} | held-out loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, scores in results.items():
        record = last_privacy_record(out_dir / name) if name != "base" else None
        eps, delta, sigma, clip = (
            ("∞", "–", "–", "–")
            if record is None
            else (
                f"{record['epsilon']:.3g}",
                f"{record['delta']:.3g}",
                f"{record['noise_multiplier']:.3g}",
                f"{record['clip_norm']:g}",
            )
        )
        rows.append(
            f"| {name} | {eps} | {delta} | {sigma} | {clip} | {scores[metric]['mean']:.2f} "
            f"| {scores['loss']['mean']:.3f} |"
        )
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", type=Path, required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--clip-norm", type=float, default=2.0, help="C for the DP runs")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    out_dir = Path(f"{cfg.output_dir}-privacy")
    named: dict[str, RunConfig | None] = {
        "base": None,
        "fedavg-no-dp": private_config(cfg, out_dir, "fedavg-no-dp", PrivacyConfig()),
    }
    for target in TARGET_EPSILONS:
        privacy = PrivacyConfig(
            mode="central", clip_norm=args.clip_norm, target_epsilon=target, reproducible_noise=True
        )
        name = f"dp-eps{target:g}"
        named[name] = private_config(cfg, out_dir, name, privacy)
    results = compare_configs(cfg, named, out_dir)
    table = privacy_table(cfg, results, out_dir)
    (out_dir / "privacy.md").write_text(table)
    console.print(table)


if __name__ == "__main__":
    main()
