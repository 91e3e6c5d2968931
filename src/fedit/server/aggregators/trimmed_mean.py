"""Coordinate-wise trimmed mean (Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates", ICML 2018, Definition 2)."""

from __future__ import annotations

import math

import torch

from fedit.ops.aggregation import _check_keys, _wide, client_deltas
from fedit.server.aggregators.robust import RobustAggregator, distances_to
from fedit.types import AdapterState, ClientUpdate


def trimmed_mean(deltas: list[AdapterState], trim: int) -> AdapterState:
    """The coordinate-wise b-trimmed mean of n deltas, b = ``trim``.

    For every coordinate j of every tensor, sort the n values Δ_1[j], ..., Δ_n[j], drop the
    b smallest and the b largest and average the n − 2b left:

        Δ[j] = 1/(n − 2b) · Σ_{i = b+1}^{n−b} Δ_(i)[j]      (Δ_(i)[j]: the i-th smallest)

    Yin et al. trim a fraction β of the n values at each end and need β above the fraction
    of Byzantine machines (and below 1/2). Unweighted, as in the paper: every update counts
    once whatever its p_k (a weighted trimmed mean would let a client's declared record
    count move the order statistics it is meant to resist). b = 0 is the plain mean;
    b = ⌊(n − 1)/2⌋ is the coordinate-wise median. Float32 (float64 kept); the inputs are
    not modified.
    """
    n = len(deltas)
    if trim < 0 or 2 * trim >= n:
        raise ValueError(f"a trimmed mean of {n} values cannot trim {trim} at each end")
    _check_keys(deltas[0], deltas[1:])
    result = {}
    for key in deltas[0]:
        stacked = torch.stack([_wide(d[key]) for d in deltas])
        result[key] = stacked.sort(dim=0).values[trim : n - trim].mean(dim=0)
    return result


class TrimmedMeanAggregator(RobustAggregator):
    """Δ = the coordinate-wise trimmed mean of the Δ_k, trimming ``trim_count`` updates at
    each end, or ⌈trim_fraction · n⌉ when no count is set (at least the fraction, so a
    fraction of possibly Byzantine clients is always covered). Metrics: the number trimmed at
    each end and each client's distance to the aggregate."""

    name = "trimmed_mean"

    def __init__(self, trim_count: int | None, trim_fraction: float) -> None:
        super().__init__()
        self.trim_count, self.trim_fraction = trim_count, trim_fraction

    def trim(self, n: int) -> int:
        """b for a round of n updates."""
        if self.trim_count is not None:
            return self.trim_count
        return math.ceil(round(self.trim_fraction * n, 9))  # 0.1 · 30 is 3.0000000000000004

    def too_few(self, n: int) -> str | None:
        b = self.trim(n)
        if 2 * b < n:
            return None
        setting = "trim_count" if self.trim_count is not None else "trim_fraction"
        return (
            f"strategy.aggregator = 'trimmed_mean' trims {b} update(s) at each end "
            f"(strategy.{setting}) and needs more than {2 * b} updates, got {n}"
        )

    def delta(self, global_state, updates: list[ClientUpdate], weights, round_index):
        self.check_count(len(updates), round_index)
        deltas = client_deltas(global_state, updates)
        trim = self.trim(len(deltas))
        aggregate = trimmed_mean(deltas, trim)
        self._metrics = {
            "trimmed_per_end": trim,
            "distance_to_aggregate": distances_to(aggregate, deltas, updates),
        }
        return aggregate
