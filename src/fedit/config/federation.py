"""[federation] and [strategy]: who trains each round, and how the server aggregates."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedit import plugins
from fedit.config.fields import require

SELECTIONS = ("uniform", "available", "power_of_choice")
RANK_AGGREGATIONS = ("zero_pad", "holders")


@dataclass
class FederationConfig:
    """Rounds, client selection, and the training mode (federated or a baseline)."""

    mode: str = "federated"  # federated | local (one client's records) | centralized (pooled)
    rounds: int = 10  # rounds of the federation
    clients_per_round: int | None = None  # a count; or set fraction; neither: all clients
    # the share of clients sampled per round (or set clients_per_round)
    fraction: float | None = None
    local_client: int = 0  # mode = local: which client's records
    # mode = local: train on these categories' records instead of one client's (the FedIT
    # paper's Local-1/2/3 baselines are defined by category)
    local_categories: list[str] = field(default_factory=list)
    # uniform: m of all N clients; available: m of the clients online this round (the
    # simulated devices' availability, [system]); power_of_choice: the m of `candidates`
    # clients (drawn as uniform or available draws m) whose records the global adapter
    # fits worst (Cho et al. 2020; fedit.fleet.selection.highest_losses)
    selection: str = "uniform"
    candidates: int | None = None  # d for power_of_choice (unset: 2m, at most N)
    probe_records: int = 8  # records per candidate its loss is measured on

    def validate(self) -> None:
        require(
            self.selection in SELECTIONS,
            "federation.selection",
            f"must be one of {', '.join(SELECTIONS)}",
        )
        require(
            self.mode in {"federated", "local", "centralized"},
            "federation.mode",
            "must be federated, local or centralized",
        )
        require(self.rounds >= 1, "federation.rounds", "must be >= 1")
        require(
            self.clients_per_round is None or self.clients_per_round >= 1,
            "federation.clients_per_round",
            "must be >= 1",
        )
        require(
            self.fraction is None or 0 < self.fraction <= 1,
            "federation.fraction",
            "must be in (0, 1]",
        )
        require(
            self.clients_per_round is None or self.fraction is None,
            "federation",
            "set clients_per_round or fraction, not both",
        )
        require(self.local_client >= 0, "federation.local_client", "must be >= 0")
        require(
            self.candidates is None or self.candidates >= 1,
            "federation.candidates",
            "must be >= 1",
        )
        require(self.probe_records >= 1, "federation.probe_records", "must be >= 1")


def clients_per_round(num_clients: int, count: int | None, fraction: float | None) -> int:
    """A count, or ceil(fraction × clients), or everyone (federation.clients_per_round or
    fraction, for `num_clients` clients)."""
    if count is not None:
        return min(count, num_clients)
    if fraction is not None:
        return max(1, math.ceil(fraction * num_clients))
    return num_clients


@dataclass
class StrategyConfig:
    """Server aggregation algorithm and its hyperparameters (see fedit.server.strategies)."""

    # the server algorithm: fedavg | fedprox | scaffold | fedavgm | fedadagrad | fedyogi | fedadam
    # (or a registered one; see algorithms.md)
    name: str = "fedavg"
    weighting: str = "examples"  # examples (p_k = n_k / sum n) | uniform
    lora_aggregation: str = "separate"  # separate | exact (see fedit.ops.lora_aggregation)
    # mixed LoRA ranks (lora.client_ranks / rank_tiers; fedit.ops.ranks): zero_pad
    # (HetLoRA: a component a client lacks counts as 0) | holders (averaged over the
    # clients that have it)
    rank_aggregation: str = "zero_pad"
    # how the clients' deltas become one (fedit.server.aggregators): mean | a robust rule
    aggregator: str = "mean"
    prox_mu: float = 0.01  # fedprox
    # fedavgm (eta_s), scaffold (eta_g): 1.0 is plain averaging. fedadam/fedyogi/fedadagrad
    # (eta): their steps are ~eta per coordinate, so set it, e.g. 1e-3..1e-2.
    server_lr: float = 1.0
    server_momentum: float = 0.9  # fedavgm beta
    beta1: float = 0.9  # adaptive methods: the first moments' decay
    beta2: float = 0.99  # adaptive methods: the second moments' decay
    tau: float = 1e-3  # adaptive methods: τ, added to √v in the step's denominator (v starts at τ²)
    # robust aggregators (fedit.server.aggregators), each read only by the rules named
    byzantine_clients: int = 1  # krum, multi_krum: f (a round needs >= 2f + 3 updates)
    krum_selected: int | None = None  # multi_krum: m averaged (unset: n - f)
    trim_fraction: float = 0.1  # trimmed_mean: ceil(fraction * n) trimmed at each end
    trim_count: int | None = None  # trimmed_mean: this many at each end (overrides fraction)
    clip_norm: float | None = None  # norm_clip: C (unset: the round's median update norm)
    centered_clip_tau: float | None = None  # centered_clip: tau (unset: median distance)
    centered_clip_iters: int = 1  # centered_clip: L clipping steps per round

    @property
    def client_state(self) -> bool:
        """Whether the strategy keeps state per client (fedit.plugins.StrategyTraits)."""
        return plugins.STRATEGIES[self.name].client_state

    @property
    def aggregator_traits(self) -> plugins.AggregatorTraits:
        """What kind of rule strategy.aggregator is (fedit.plugins.AggregatorTraits)."""
        return plugins.AGGREGATORS[self.aggregator]

    def validate(self) -> None:
        # fedit.plugins is the one list of names (a part registered at run time counts)
        strategies, aggregators = plugins.STRATEGIES, plugins.AGGREGATORS
        require(
            self.name in strategies,
            "strategy.name",
            f"unknown strategy {self.name!r} (known: {', '.join(sorted(strategies))})",
        )
        require(
            self.aggregator in aggregators,
            "strategy.aggregator",
            f"unknown aggregator {self.aggregator!r} (known: {', '.join(sorted(aggregators))})",
        )
        require(
            self.rank_aggregation in RANK_AGGREGATIONS,
            "strategy.rank_aggregation",
            f"must be one of {', '.join(RANK_AGGREGATIONS)}",
        )
        require(
            self.weighting in {"examples", "uniform"},
            "strategy.weighting",
            "must be examples or uniform",
        )
        require(
            self.lora_aggregation in {"separate", "exact"},
            "strategy.lora_aggregation",
            "must be separate or exact",
        )
        require(self.prox_mu >= 0, "strategy.prox_mu", "must be >= 0")
        require(self.server_lr > 0, "strategy.server_lr", "must be positive")
        require(0 <= self.server_momentum < 1, "strategy.server_momentum", "must be in [0, 1)")
        require(0 <= self.beta1 < 1, "strategy.beta1", "must be in [0, 1)")
        require(0 <= self.beta2 < 1, "strategy.beta2", "must be in [0, 1)")
        require(self.tau > 0, "strategy.tau", "must be positive")
        self._validate_robust()

    def _validate_robust(self) -> None:
        """The robust rules' settings (fedit.server.aggregators); what they cannot protect is
        in fedit.config.rules."""
        require(self.byzantine_clients >= 0, "strategy.byzantine_clients", "must be >= 0")
        require(
            self.krum_selected is None or self.krum_selected >= 1,
            "strategy.krum_selected",
            "must be >= 1 or unset",
        )
        require(0 <= self.trim_fraction < 0.5, "strategy.trim_fraction", "must be in [0, 0.5)")
        require(
            self.trim_count is None or self.trim_count >= 0,
            "strategy.trim_count",
            "must be >= 0 or unset",
        )
        for name in ("clip_norm", "centered_clip_tau"):
            value = getattr(self, name)
            require(value is None or value > 0, f"strategy.{name}", "must be positive or unset")
        require(self.centered_clip_iters >= 1, "strategy.centered_clip_iters", "must be >= 1")
