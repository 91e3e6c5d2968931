"""Unreliable devices on one task: rounds and simulated time to reach the reliable run's
final held-out loss when 30% of the clients are offline each round and a deadline drops
stragglers, with uniform and availability-aware selection.

    .venv/bin/python scripts/devices.py -c configs/demo.toml [--set key=value ...]

Every run simulates the same devices (speeds and links drawn from the run seed, below). The
reliable run has no dropout and no deadline and runs the config's rounds; the unreliable
ones may take up to ROUND_FACTOR times as many. Held-out loss is evaluated after every round.
Runs go to <output_dir>-devices/<name>/, the table to <output_dir>-devices/devices.md.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from experiment_cli import experiment_config

from fedit.config import RunConfig, SystemConfig
from fedit.engine.simulation import Simulation, console

ROUND_FACTOR = 2
DEVICES = {  # a phone-class fleet: 2 s steps, speeds and links spread by a factor ~e
    "step_seconds": 2.0,
    "speed_spread": 0.5,
    "bandwidth_mbps": 20.0,
    "bandwidth_spread": 1.0,
}
RUNS: dict[str, tuple[dict, str]] = {  # name -> ([system] beyond DEVICES, selection)
    "reliable": ({}, "uniform"),
    "dropout-0.3-deadline": ({"dropout": 0.3, "deadline": 20.0}, "uniform"),
    "dropout-0.3-deadline-available": ({"dropout": 0.3, "deadline": 20.0}, "available"),
}


def run_config(cfg: RunConfig, out_dir: Path, name: str) -> RunConfig:
    system, selection = RUNS[name]
    rounds = cfg.federation.rounds * (1 if name == "reliable" else ROUND_FACTOR)
    federation = replace(cfg.federation, rounds=rounds, selection=selection)
    return replace(
        cfg,
        system=SystemConfig(enabled=True, **DEVICES, **system),
        federation=federation,
        eval=replace(cfg.eval, every_rounds=1),
        output_dir=str(out_dir / name),
    ).validate()


def history(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line["round"] > 0]


def loss(line: dict) -> float:
    return line["heldout"]["overall"]["loss"]


def table(out_dir: Path) -> str:
    reliable = history(out_dir / "reliable")
    target = loss(reliable[-1])
    rows = [
        f"Target: the reliable run's held-out loss after its {len(reliable)} rounds, "
        f"{target:.4f}.\n",
        "| run | rounds run | dropped client-rounds | rounds to target | simulated time to "
        "target | final held-out loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in RUNS:
        lines = history(out_dir / name)
        dropped = sum(len(line.get("dropped", [])) for line in lines)
        reached = next((line for line in lines if loss(line) <= target), None)
        when = (
            f"{reached['round']} | {reached['simulated_clock']:,.0f} s"
            if reached
            else "not reached | –"
        )
        rows.append(f"| {name} | {len(lines)} | {dropped} | {when} | {loss(lines[-1]):.4f} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    cfg, out_dir = experiment_config(__doc__, "devices")
    for name in RUNS:
        Simulation(run_config(cfg, out_dir, name)).run(resume=True)
    text = table(out_dir)
    (out_dir / "devices.md").write_text(text)
    console.print(text)


if __name__ == "__main__":
    main()
