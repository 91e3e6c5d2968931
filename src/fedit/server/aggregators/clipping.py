"""Norm-bounded clipping (Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated
Learning?", 2019, "norm thresholding of updates")."""

from __future__ import annotations

import statistics

from fedit.ops.aggregation import client_deltas, clip_to_norm, state_norm, weighted_mean
from fedit.server.aggregators.robust import RobustAggregator, ids
from fedit.types import AdapterState, ClientUpdate


def norm_clipped_mean(
    deltas: list[AdapterState], weights: list[float], bound: float
) -> AdapterState:
    """Δ = Σ_k p_k clip_C(Δ_k).

    Sun et al. bound each update's norm by C before FedAvg's weighted mean, so a scaled
    (boosted) update, the usual way one client's backdoor survives averaging, moves the
    model by at most p_k·C. Its direction is untouched: a small malicious update passes.
    With ``weighting = "examples"`` p_k comes from the client's own record count, so the
    bound p_k·C is only as good as that count (``weighting = "uniform"`` makes it C/K).
    Float32 (float64 kept); the inputs are not modified.
    """
    return weighted_mean([clip_to_norm(d, bound)[0] for d in deltas], weights)


class NormClipAggregator(RobustAggregator):
    """Δ = Σ_k p_k clip_C(Δ_k), C = ``clip_norm``; unset, C is the median ‖Δ_k‖ of the
    round's updates (fedit's default, not the paper's fixed C: scale-free, and a minority
    cannot raise it beyond the honest norms). Metrics: C, the clipped client ids and the
    largest and median norm."""

    name = "norm_clip"

    def __init__(self, clip_norm: float | None) -> None:
        super().__init__()
        self.clip_norm = clip_norm

    def delta(self, global_state, updates: list[ClientUpdate], weights, round_index):
        deltas = client_deltas(global_state, updates)
        norms = [state_norm(d) for d in deltas]
        bound = self.clip_norm if self.clip_norm is not None else statistics.median(norms)
        aggregate = norm_clipped_mean(deltas, weights, bound)
        self._metrics = {
            "clip_norm": bound,
            "clipped": ids(updates, [i for i, n in enumerate(norms) if n > bound]),
            "norm_max": max(norms),
            "norm_median": statistics.median(norms),
        }
        return aggregate
