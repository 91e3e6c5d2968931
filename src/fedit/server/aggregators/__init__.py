"""Aggregators: how a round's client deltas Δ_k become the one Δ a strategy applies.

Every strategy but FedAvg-with-the-mean steps its server optimiser with Δ (FedAvgM's
momentum, FedAdam's moments, SCAFFOLD's x ← x + η_g Δ); FedAvg applies x + Δ. The
aggregator is that one step, separate from the strategy so that a robust rule (median,
trimmed mean, Krum, clipping) or the clipped-and-noised mean of central differential
privacy plugs in under any strategy it is sound for. The default, "mean", is
Δ = Σ_k p_k Δ_k.

Each aggregator is registered here by name (``strategy.aggregator``); the maths of each rule
lives in its own module as a pure function over adapter tensors:

- "median", "trimmed_mean" (``median``, ``trimmed_mean``; Yin et al. 2018): coordinate-wise,
  unweighted; ``trim_count`` or ``trim_fraction`` updates trimmed at each end.
- "krum", "multi_krum" (``krum``; Blanchard et al. 2017): f = ``byzantine_clients``,
  m = ``krum_selected``; a round needs n ≥ 2f + 3 updates.
- "norm_clip" (``clipping``; Sun et al. 2019): each Δ_k clipped to ``clip_norm``, then the
  weighted mean.
- "centered_clip" (``centered_clip``; Karimireddy et al. 2021): ``centered_clip_tau``,
  ``centered_clip_iters``; its centre is carried across rounds and checkpointed.

A rule that needs a number of updates (Krum, the trimmed mean, the median's 3) is checked
against the configured clients per round when it is built (a ConfigError), and against each
round's updates (``robust.TooFewUpdatesError`` stops the run: fewer updates than the rule
needs would void the guarantee asked for). The baselines (``federation.mode`` local or
centralized) train one client and always use the mean: there is nothing to out-vote.

Where the robust rules are sound, by strategy:

- fedavg, fedprox: sound. x ← x + Δ with Δ the rule's output is the setting the papers
  analyse (one robust aggregate of the workers' updates per step). FedProx's proximal term
  is client-side; a Byzantine client ignores it whatever the server does.
- fedavgm: sound. The momentum is linear in the Δ's, so the bias a rule lets through in a
  round enters the velocity and is summed over rounds with weights β^t: at most 1/(1 − β)
  times one round's. (Karimireddy et al. show that worker momentum helps robust rules
  against attacks coupled across rounds; server momentum is not that.)
- fedadam, fedyogi, fedadagrad: usable, with a weaker guarantee. The rules bound the
  distance of Δ from the honest updates in norm, but the per-coordinate normalisation
  m / (√v + τ) turns a small bias in a coordinate where honest Δ is near zero into a step of
  up to about η: the rule's bound does not carry over to the step.
- scaffold: refused. Its server control variate c is the mean of the clients' control
  deltas, which no rule on Δ filters, and every client adds c to every local gradient of
  the next round, so one Byzantine client still steers all of them.
- ``lora_aggregation = "exact"``: refused. Its FedEx-LoRA residual re-adds every client's
  B_k A_k with weight p_k into the base weights, undoing whatever the rule left out or
  clipped.

Weights: a client's p_k under ``weighting = "examples"`` comes from the record count it
declares. The median and trimmed mean ignore p_k (as in the papers); Krum selects without
them; Multi-Krum, norm clipping and centred clipping average with p_k (the papers' uniform
rules are ``weighting = "uniform"``), so there one client's influence is bounded by its p_k
times the rule's bound: use uniform weights where the counts are not trusted.
"""

from __future__ import annotations

from collections.abc import Callable

from fedit import plugins
from fedit.config import ConfigError, RunConfig, StrategyConfig, clients_per_round
from fedit.privacy.plan import resolve_plan
from fedit.server.aggregators.base import Aggregator, MeanAggregator
from fedit.server.aggregators.centered_clip import CenteredClipAggregator
from fedit.server.aggregators.clipping import NormClipAggregator
from fedit.server.aggregators.dp_fedavg import DPFedAvgAggregator
from fedit.server.aggregators.krum import KrumAggregator, MultiKrumAggregator
from fedit.server.aggregators.median import MedianAggregator
from fedit.server.aggregators.robust import RobustAggregator
from fedit.server.aggregators.trimmed_mean import TrimmedMeanAggregator

AGGREGATORS: dict[str, Callable[[RunConfig, int], Aggregator]] = {}
# The rules refused with SCAFFOLD and exact LoRA aggregation (see above, and
# StrategyConfig.validate): the robust trait of fedit.plugins.
ROBUST_AGGREGATORS = plugins.robust_aggregators()


def register_aggregator(
    name: str,
    factory: Callable[[RunConfig, int], Aggregator],
    traits: plugins.AggregatorTraits | None = None,
) -> None:
    """Add an aggregator factory (run config, number of clients) → Aggregator under ``name``,
    with the traits the config's rules read (None: a built-in's, declared in fedit.plugins)."""
    if name in AGGREGATORS:
        raise ValueError(f"aggregator {name!r} is already registered")
    plugins.declare_aggregator(name, traits)
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


def robust_factory(
    make: Callable[[StrategyConfig], RobustAggregator],
) -> Callable[[RunConfig, int], Aggregator]:
    """A factory building ``make(cfg.strategy)`` for federated runs, after checking that the
    configured clients per round are enough for it; the mean for the baselines."""

    def factory(cfg: RunConfig, num_clients: int) -> Aggregator:
        if cfg.federation.mode != "federated":
            return MeanAggregator()
        aggregator = make(cfg.strategy)
        fed = cfg.federation
        per_round = clients_per_round(num_clients, fed.clients_per_round, fed.fraction)
        why = aggregator.too_few(per_round)
        if why is not None:
            raise ConfigError(
                f"{why} per round: federation.clients_per_round (or fraction) gives "
                f"{per_round} of {num_clients} clients"
            )
        return aggregator

    return factory


register_aggregator("mean", lambda cfg, num_clients: MeanAggregator())
register_aggregator("dp_fedavg", _dp_fedavg)
register_aggregator("median", robust_factory(lambda s: MedianAggregator()))
register_aggregator(
    "trimmed_mean", robust_factory(lambda s: TrimmedMeanAggregator(s.trim_count, s.trim_fraction))
)
register_aggregator("krum", robust_factory(lambda s: KrumAggregator(s.byzantine_clients)))
register_aggregator(
    "multi_krum",
    robust_factory(lambda s: MultiKrumAggregator(s.byzantine_clients, s.krum_selected)),
)
register_aggregator("norm_clip", robust_factory(lambda s: NormClipAggregator(s.clip_norm)))
register_aggregator(
    "centered_clip",
    robust_factory(lambda s: CenteredClipAggregator(s.centered_clip_tau, s.centered_clip_iters)),
)

__all__ = [
    "AGGREGATORS",
    "ROBUST_AGGREGATORS",
    "Aggregator",
    "MeanAggregator",
    "build_aggregator",
    "register_aggregator",
]
