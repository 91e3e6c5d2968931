"""Server strategies, one module per paper, and the registry that builds one by name.

Each strategy is added with one explicit ``register`` call below, under a name fedit.plugins
declares with its traits; a new algorithm adds its module and one line here (or decorates
its class with ``@register("name", traits)``), which declares its name and traits there.
"""

from __future__ import annotations

from collections.abc import Callable

from fedit import plugins
from fedit.config import ConfigError, StrategyConfig
from fedit.server.aggregators import Aggregator
from fedit.server.strategies.base import Strategy
from fedit.server.strategies.fedadaptive import FedAdagrad, FedAdam, FedYogi
from fedit.server.strategies.fedavg import FedAvg
from fedit.server.strategies.fedavgm import FedAvgM
from fedit.server.strategies.fedprox import FedProx
from fedit.server.strategies.scaffold import Scaffold

STRATEGIES: dict[str, type[Strategy]] = {}


def register(
    name: str, traits: plugins.StrategyTraits | None = None
) -> Callable[[type[Strategy]], type[Strategy]]:
    """Add a Strategy class to ``STRATEGIES`` under ``name`` (usable as a decorator), with
    the traits the config's rules read (None: a built-in's, declared in fedit.plugins)."""

    def add(cls: type[Strategy]) -> type[Strategy]:
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} is already registered ({STRATEGIES[name]})")
        plugins.declare_strategy(name, traits)
        STRATEGIES[name] = cls
        return cls

    return add


def build_strategy(
    config: StrategyConfig, num_clients: int, aggregator: Aggregator | None = None
) -> Strategy:
    """The strategy ``config.name`` names, for a federation of ``num_clients`` clients,
    combining deltas with ``aggregator`` (the weighted mean if None)."""
    if config.name not in STRATEGIES:
        known = ", ".join(sorted(STRATEGIES))
        raise ConfigError(f"strategy.name: unknown strategy {config.name!r} (known: {known})")
    return STRATEGIES[config.name](config, num_clients, aggregator)


register("fedavg")(FedAvg)
register("fedprox")(FedProx)
register("scaffold")(Scaffold)
register("fedavgm")(FedAvgM)
register("fedadagrad")(FedAdagrad)
register("fedyogi")(FedYogi)
register("fedadam")(FedAdam)

__all__ = ["STRATEGIES", "Strategy", "build_strategy", "register"]
