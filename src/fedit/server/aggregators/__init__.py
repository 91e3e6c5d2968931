"""Aggregators: how a round's client deltas Δ_k become the one Δ a strategy applies.

Every strategy but FedAvg-with-the-mean steps its server optimiser with Δ (FedAvgM's
momentum, FedAdam's moments, SCAFFOLD's x ← x + η_g Δ); FedAvg applies x + Δ. The
aggregator is that one step, separate from the strategy so that a robust rule (median,
trimmed mean, Krum, clipping) or the clipped-and-noised mean of central differential
privacy plugs in under any strategy it is sound for (``config.check_aggregator`` says which
combinations are refused and why). The default, "mean", is Δ = Σ_k p_k Δ_k.

Each aggregator is registered here by name (``strategy.aggregator``); the maths of each rule
lives in its own module as a pure function over adapter tensors.
"""

from __future__ import annotations

from collections.abc import Callable

from fedit.config import ConfigError, RunConfig
from fedit.privacy.plan import resolve_plan
from fedit.server.aggregators.base import Aggregator, MeanAggregator
from fedit.server.aggregators.dp_fedavg import DPFedAvgAggregator

AGGREGATORS: dict[str, Callable[[RunConfig, int], Aggregator]] = {}


def register_aggregator(name: str, factory: Callable[[RunConfig, int], Aggregator]) -> None:
    """Add an aggregator factory (run config, number of clients) → Aggregator under ``name``."""
    if name in AGGREGATORS:
        raise ValueError(f"aggregator {name!r} is already registered")
    AGGREGATORS[name] = factory


def build_aggregator(cfg: RunConfig, num_clients: int) -> Aggregator:
    """The aggregator ``cfg.strategy.aggregator`` names, for ``num_clients`` clients; with
    privacy.mode = "central", DP-FedAvg's clipped and noised mean (the config allows no
    other aggregator then)."""
    name = "dp_fedavg" if cfg.privacy.mode == "central" else cfg.strategy.aggregator
    if name not in AGGREGATORS:
        known = ", ".join(sorted(AGGREGATORS))
        raise ConfigError(f"strategy.aggregator: unknown aggregator {name!r} (known: {known})")
    return AGGREGATORS[name](cfg, num_clients)


def _dp_fedavg(cfg: RunConfig, num_clients: int) -> Aggregator:
    plan = resolve_plan(cfg, num_clients)
    if plan is None or plan.mode != "central":
        raise ConfigError("strategy.aggregator: 'dp_fedavg' needs privacy.mode = 'central'")
    return DPFedAvgAggregator(plan)


register_aggregator("mean", lambda cfg, num_clients: MeanAggregator())
register_aggregator("dp_fedavg", _dp_fedavg)

__all__ = ["AGGREGATORS", "Aggregator", "MeanAggregator", "build_aggregator", "register_aggregator"]
