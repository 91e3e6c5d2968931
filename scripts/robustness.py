"""Byzantine robustness on one task: every attack of fedit's harness against FedAvg and the
robust aggregation rules, with 20% of the clients malicious.

    .venv/bin/python scripts/robustness.py -c configs/demo.toml [--attacks a,b] [--rules r,s]

The federation takes every client every round (federation.clients_per_round = all), so the
malicious share of each round is the population's (2 of 10 on the demo) and Krum's
n ≥ 2f + 3 holds with f = 2; train.max_steps is 2 to keep a run near 2.5 min on an AVX2 CPU.
Each attack is one comparison of the rules (<output_dir>-robustness/<attack>/scores.md,
one run per rule below it); a comparison whose scores.json already holds every rule is not
re-scored, so the experiment can be run in parts. The summary tables go to
<output_dir>-robustness/robustness.md.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from fedit.config import AttackConfig, RunConfig, load_config
from fedit.engine.simulation import console
from fedit.experiments.compare import compare_configs, generation_metric

MALICIOUS_FRACTION = 0.2
# attack name -> [attack] settings. "clean": nobody attacks, but the backdoor's metrics are
# computed, the reference row for attack success.
ATTACKS: dict[str, dict] = {
    "clean": {"kind": "backdoor"},
    "sign_flip": {"kind": "sign_flip", "flip_scale": 4.0},
    "scale": {"kind": "scale", "scale": 10.0},
    "gaussian": {"kind": "gaussian", "noise_std": 0.05},
    "poison_responses": {"kind": "poison_responses"},
    "backdoor": {"kind": "backdoor", "poison_fraction": 0.5},
}
# rule name -> [strategy] settings; f = 2 = 20% of 10 clients for the rules that take it.
RULES: dict[str, dict] = {
    "fedavg": {"aggregator": "mean"},
    "median": {"aggregator": "median"},
    "trimmed_mean": {"aggregator": "trimmed_mean", "trim_count": 2},
    "multi_krum": {"aggregator": "multi_krum", "byzantine_clients": 2},
    "norm_clip": {"aggregator": "norm_clip"},
}


def experiment_config(cfg: RunConfig) -> RunConfig:
    federation = replace(cfg.federation, clients_per_round=cfg.partition.num_clients)
    return replace(cfg, federation=federation, train=replace(cfg.train, max_steps=2)).validate()


def attacked_config(cfg: RunConfig, attack: str) -> RunConfig:
    """The experiment config under ``attack``: also the comparison's, so every rule's model
    is scored against it (the data attacks' success metrics)."""
    fraction = 0.0 if attack == "clean" else MALICIOUS_FRACTION
    return replace(cfg, attack=AttackConfig(fraction=fraction, **ATTACKS[attack])).validate()


def compared(cfg: RunConfig, attack: str, rules: list[str], out_dir: Path) -> dict[str, dict]:
    """The attack's comparison of ``rules``: its scores.json if it holds them all, else
    trained (resuming) and scored."""
    group_dir = out_dir / attack
    scores_file = group_dir / "scores.json"
    if scores_file.exists():
        scores = json.loads(scores_file.read_text())
        if set(rules) <= set(scores):
            return {rule: scores[rule] for rule in rules}
    attacked = attacked_config(cfg, attack)
    named: dict[str, RunConfig | None] = {
        rule: replace(
            attacked,
            strategy=replace(attacked.strategy, **RULES[rule]),
            output_dir=str(group_dir / rule),
        ).validate()
        for rule in rules
    }
    return compare_configs(attacked, named, group_dir)


def table(results: dict[str, dict[str, dict]], rules: list[str], cell) -> str | None:
    rows = ["| attack | " + " | ".join(rules) + " |", "|---|" + "---:|" * len(rules)]
    for attack, by_rule in results.items():
        cells = [cell(by_rule[rule]) for rule in rules]
        if any(c is not None for c in cells):
            rows.append(f"| {attack} | " + " | ".join(c or "–" for c in cells) + " |")
    return "\n".join(rows) + "\n" if len(rows) > 2 else None


def summary(cfg: RunConfig, results: dict[str, dict[str, dict]], rules: list[str]) -> str:
    metric = generation_metric(cfg)

    def rate(key: str):
        return lambda s: f"{s['attack'][key]:.2f}" if key in s.get("attack", {}) else None

    parts = [
        (f"mean {metric.replace('_', ' ')}", lambda s: f"{s[metric]['mean']:.2f}"),
        ("held-out loss (token-weighted mean)", lambda s: f"{s['loss']['mean']:.3f}"),
        ("attack success: the poisoned target on clean prompts", rate("attack_success")),
        ("trigger success: the target on triggered prompts", rate("trigger_success")),
    ]
    tables = [(label, table(results, rules, cell)) for label, cell in parts]
    return "\n".join(f"### {label}\n\n{text}" for label, text in tables if text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", type=Path, required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated")
    parser.add_argument("--rules", default=",".join(RULES), help="comma-separated")
    args = parser.parse_args()
    attacks, rules = args.attacks.split(","), args.rules.split(",")
    for given, known, flag in ((attacks, ATTACKS, "--attacks"), (rules, RULES, "--rules")):
        if unknown := sorted(set(given) - set(known)):
            parser.error(f"{flag}: unknown {unknown}; known: {', '.join(known)}")
    cfg = experiment_config(load_config(args.config, args.overrides))
    out_dir = Path(f"{cfg.output_dir}-robustness")
    results = {attack: compared(cfg, attack, rules, out_dir) for attack in attacks}
    text = summary(cfg, results, rules)
    (out_dir / "robustness.md").write_text(text)
    console.print(text)


if __name__ == "__main__":
    main()
