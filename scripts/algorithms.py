"""Run all seven federated algorithms with the same budget, plus local-only training, and
write one comparison table (OpenFedLLM's "every FL algorithm beats local training").

    .venv/bin/python scripts/algorithms.py -c configs/algorithms.toml [--set key=value ...]
    .venv/bin/python scripts/algorithms.py -c configs/algorithms.toml \
        --only fedadagrad,fedyogi,fedadam --server-lr 1e-2 --set output_dir=runs/algorithms-lr

Each algorithm's hyperparameters are set below, the rest comes from the config. Results go
to <output_dir>/scores.md, scores.json and charts; each run to <output_dir>/<name>/.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from fedit.config import RunConfig, load_config
from fedit.engine.simulation import console
from fedit.experiments.compare import Contender, compare_configs

# name -> strategy overrides (server learning rates for the adaptive methods follow
# Reddi et al.'s practice of a server lr well below 1 with tau = 1e-3).
ALGORITHMS: dict[str, dict[str, float | str]] = {
    "fedavg": {},
    "fedprox": {"prox_mu": 0.01},
    "scaffold": {"server_lr": 1.0},
    "fedavgm": {"server_momentum": 0.9, "server_lr": 1.0},
    "fedadagrad": {"server_lr": 3e-3},
    "fedyogi": {"server_lr": 3e-3},
    "fedadam": {"server_lr": 3e-3},
}
LOCAL_CLIENTS = (0, 1, 8)  # the demo's Local models


def algorithm_config(
    cfg: RunConfig, name: str, out_dir: Path, server_lr: float | None = None
) -> RunConfig:
    settings = ALGORITHMS[name] | ({} if server_lr is None else {"server_lr": server_lr})
    strategy = replace(cfg.strategy, name=name, **settings)
    return replace(cfg, strategy=strategy, output_dir=str(out_dir / name)).validate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", type=Path, required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--only", help="comma-separated algorithms to run, without the local models"
    )
    parser.add_argument("--server-lr", type=float, help="server_lr for every algorithm run")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    out_dir = Path(cfg.output_dir)
    names = args.only.split(",") if args.only else list(ALGORITHMS)
    unknown = sorted(set(names) - set(ALGORITHMS))
    if unknown:
        parser.error(f"--only: unknown algorithms {unknown}; known: {', '.join(ALGORITHMS)}")
    named: dict[str, RunConfig | None] = {}
    if not args.only:
        named = {f"local-{k}": Contender(f"local:{k}").config(cfg, out_dir) for k in LOCAL_CLIENTS}
    named |= {name: algorithm_config(cfg, name, out_dir, args.server_lr) for name in names}
    compare_configs(cfg, named, out_dir)
    console.print((out_dir / "scores.md").read_text())


if __name__ == "__main__":
    main()
