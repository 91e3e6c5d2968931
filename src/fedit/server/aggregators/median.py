"""Coordinate-wise median (Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates", ICML 2018, Definition 1)."""

from __future__ import annotations

from fedit.server.aggregators.trimmed_mean import TrimmedMeanAggregator, trimmed_mean
from fedit.types import AdapterState


def coordinate_median(deltas: list[AdapterState]) -> AdapterState:
    """Δ[j] = med{Δ_1[j], ..., Δ_n[j]} for every coordinate j of every tensor.

    The usual one-dimensional median: the middle value for odd n, the mean of the two
    middle values for even n. That is the trimmed mean with b = ⌊(n − 1)/2⌋ trimmed at each
    end, which is how it is computed. Unweighted, as in the paper: a client's p_k (its
    declared record count) cannot move the median. It tolerates any minority of Byzantine
    updates per coordinate (breakdown point 1/2); of two updates it is their mean. Float32
    (float64 kept); the inputs are not modified.
    """
    return trimmed_mean(deltas, (len(deltas) - 1) // 2)


class MedianAggregator(TrimmedMeanAggregator):
    """Δ = the coordinate-wise median of the Δ_k (the trimmed mean with b = ⌊(n − 1)/2⌋).
    It needs n ≥ 3 updates: the median of two is their mean, which resists nothing.
    Metrics: as the trimmed mean's."""

    name = "median"

    def __init__(self) -> None:
        super().__init__(trim_count=None, trim_fraction=0.0)

    def trim(self, n: int) -> int:
        return (n - 1) // 2

    def too_few(self, n: int) -> str | None:
        if n >= 3:
            return None
        return (
            f"strategy.aggregator = 'median' needs at least 3 updates (the median of 2 is "
            f"their mean), got {n}"
        )
