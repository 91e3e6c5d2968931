"""The names and traits of fedit's pluggable parts: strategies, aggregators and codecs.

A leaf: it imports nothing of fedit's and no torch, so checking a config's names and the
rules that depend on a part's kind (fedit.config) costs nothing, and a data owner or
`fedit partition` validates a config without loading the algorithms. The built-in parts
are declared here; the registries that build them (fedit.server.strategies,
fedit.server.aggregators) register each class or factory under a declared name, and a
part added at run time declares its traits when it registers, so its name is valid too.
Rules read traits, never names: a new strategy with per-client state is refused where
SCAFFOLD is, with no edit outside its own file and its registration.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StrategyTraits:
    # The server and each client keep state per client across rounds (SCAFFOLD's control
    # variates c and c_k): it must see each client's plain update and keep the client's rank
    # and factors whole.
    client_state: bool = False


@dataclass(frozen=True)
class AggregatorTraits:
    # A Byzantine-robust rule: it reads each client's update on its own to bound one
    # client's influence (fedit.server.aggregators lists where that bound holds).
    robust: bool = False
    # It reads each client's update on its own (clips, ranks or filters it), so it cannot
    # run on secure aggregation's masked sum, nor after 'holders' rank aggregation has
    # copied one client's components into the others' updates. Only a plain weighted mean
    # does not; a new aggregator is assumed to, until it declares otherwise.
    needs_plain_updates: bool = True
    # Central DP's clipped, noised mean: the aggregator privacy.mode = "central" chooses.
    central_dp: bool = False


STRATEGIES: dict[str, StrategyTraits] = {
    "fedavg": StrategyTraits(),
    "fedprox": StrategyTraits(),
    "scaffold": StrategyTraits(client_state=True),
    "fedavgm": StrategyTraits(),
    "fedadagrad": StrategyTraits(),
    "fedyogi": StrategyTraits(),
    "fedadam": StrategyTraits(),
}

_ROBUST = AggregatorTraits(robust=True)
AGGREGATORS: dict[str, AggregatorTraits] = {
    "mean": AggregatorTraits(needs_plain_updates=False),
    "dp_fedavg": AggregatorTraits(central_dp=True),  # central DP's (privacy.mode)
    "median": _ROBUST,
    "trimmed_mean": _ROBUST,
    "krum": _ROBUST,
    "multi_krum": _ROBUST,
    "norm_clip": _ROBUST,
    "centered_clip": _ROBUST,
}

CODECS = ("none", "bf16", "int8", "topk")  # compression.upload (fedit.compression.codecs)


def declare_strategy(name: str, traits: StrategyTraits | None) -> None:
    """Make `name` a strategy.name with `traits` (None: a built-in's, declared above, or
    none of them for a new name)."""
    _declare(STRATEGIES, "strategy", name, traits or STRATEGIES.get(name, StrategyTraits()))


def declare_aggregator(name: str, traits: AggregatorTraits | None) -> None:
    """Make `name` a strategy.aggregator with `traits` (None: a built-in's, declared above,
    or none of them for a new name)."""
    _declare(AGGREGATORS, "aggregator", name, traits or AGGREGATORS.get(name, AggregatorTraits()))


def robust_aggregators() -> tuple[str, ...]:
    return tuple(name for name, traits in AGGREGATORS.items() if traits.robust)


def _declare(table: dict, kind: str, name: str, traits: object) -> None:
    known = table.get(name)
    if known is not None and known != traits:
        raise ValueError(f"{kind} {name!r} is declared with other traits: {known}")
    table[name] = traits
