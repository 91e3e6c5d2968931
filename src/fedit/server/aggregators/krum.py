"""Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedit.ops.aggregation import _check_keys, _wide, client_deltas, weighted_mean
from fedit.server.aggregators.robust import RobustAggregator, ids
from fedit.types import AdapterState, ClientUpdate


def min_updates(f: int) -> int:
    """The fewest updates Krum accepts for f Byzantine ones: n > 2f + 2 (the paper's bound)."""
    return 2 * f + 3


def squared_distances(deltas: list[AdapterState]) -> Tensor:
    """The (n, n) matrix ‖Δ_i − Δ_j‖², each Δ flattened over all its tensors (float64)."""
    _check_keys(deltas[0], deltas[1:])
    n = len(deltas)
    distances = torch.zeros(n, n, dtype=torch.float64)
    for key in deltas[0]:
        rows = torch.stack([d[key].reshape(-1) for d in deltas]).to(torch.float64)
        # Sums of squared differences, not the Gram-matrix shortcut ‖a‖² + ‖b‖² − 2a·b,
        # whose cancellation would blur the close pairs Krum is about.
        for i in range(n):
            distances[i] += (rows - rows[i]).pow(2).sum(dim=1)
    return distances


def krum_scores(deltas: list[AdapterState], f: int) -> list[float]:
    """s(i) = Σ_{j ∈ N_i} ‖Δ_i − Δ_j‖², N_i the n − f − 2 updates closest to Δ_i (not i)."""
    n = len(deltas)
    if f < 0 or n < min_updates(f):
        raise ValueError(f"Krum needs n >= 2f + 3 = {min_updates(f)} updates, got {n}")
    distances = squared_distances(deltas)
    nearest = n - f - 2
    scores = []
    for i in range(n):
        others = torch.cat([distances[i, :i], distances[i, i + 1 :]])
        scores.append(float(others.sort().values[:nearest].sum()))
    return scores


@dataclass
class KrumSelection:
    """What Multi-Krum chose: the aggregate, the selected indices and every score."""

    delta: AdapterState
    selected: list[int]
    scores: list[float]


def multi_krum(deltas: list[AdapterState], weights: list[float], f: int, m: int) -> KrumSelection:
    """Multi-Krum: the mean of the m updates with the lowest Krum scores.

    Every update i gets the score s(i) of ``krum_scores``, which is small when Δ_i lies
    close to n − f − 2 others: with at most f Byzantine updates, those neighbours of an
    honest update include honest ones, so an outlier that is far from the honest cluster
    scores badly. The m best (ties: the lower index) are averaged; m = 1 is Krum, which
    returns the single best Δ_i. Requires n ≥ 2f + 3 and 1 ≤ m ≤ n − f (more would always
    include a Byzantine update when there are f of them).

    Weights: the paper averages the m selected uniformly. fedit averages them with their
    p_k renormalised over the selection, Σ_{i ∈ S} p_i Δ_i / Σ_{i ∈ S} p_i, so
    ``weighting = "uniform"`` gives the paper's rule and "examples" keeps FedAvg's record
    weighting among the updates Krum accepted (selection itself ignores p_k; selected
    updates whose p_k are all 0 are averaged uniformly, never 0/0). Float32
    (float64 kept); the inputs are not modified.
    """
    n = len(deltas)
    if not 1 <= m <= n - f:
        raise ValueError(f"Multi-Krum selects 1..n - f = {n - f} of {n} updates, not {m}")
    scores = krum_scores(deltas, f)
    best = sorted(range(n), key=lambda i: (scores[i], i))[:m]
    selected = sorted(best)
    total = sum(weights[i] for i in selected)
    shares = [weights[i] / total if total > 0 else 1 / m for i in selected]
    chosen = [{k: _wide(t) for k, t in deltas[i].items()} for i in selected]
    delta = weighted_mean(chosen, shares)
    return KrumSelection(delta, selected, scores)


class MultiKrumAggregator(RobustAggregator):
    """Δ = Multi-Krum of the Δ_k with f = ``byzantine_clients`` and m = ``selected`` (unset:
    n − f, all but f). Metrics: the chosen client ids and every client's Krum score."""

    name = "multi_krum"

    def __init__(self, byzantine_clients: int, selected: int | None) -> None:
        super().__init__()
        self.f, self.m = byzantine_clients, selected

    def selected(self, n: int) -> int:
        """m for a round of n updates."""
        return self.m if self.m is not None else n - self.f

    def too_few(self, n: int) -> str | None:
        if n < min_updates(self.f):
            return (
                f"strategy.aggregator = {self.name!r} needs at least 2f + 3 = "
                f"{min_updates(self.f)} updates to tolerate strategy.byzantine_clients = "
                f"f = {self.f}, got {n}"
            )
        if self.selected(n) > n - self.f:
            return (
                f"strategy.krum_selected = {self.m} is more than n - f = {n - self.f} of the "
                f"{n} updates (with f = {self.f} Byzantine ones it would always average one)"
            )
        return None

    def delta(self, global_state, updates: list[ClientUpdate], weights, round_index):
        n = len(updates)
        self.check_count(n, round_index)
        deltas = client_deltas(global_state, updates)
        result = multi_krum(deltas, weights, self.f, self.selected(n))
        self._metrics = {
            "selected": ids(updates, result.selected),
            "scores": {str(u.client_id): s for u, s in zip(updates, result.scores, strict=True)},
        }
        return result.delta


class KrumAggregator(MultiKrumAggregator):
    """Δ = Krum of the Δ_k: the one client delta with the lowest score (Multi-Krum, m = 1)."""

    name = "krum"

    def __init__(self, byzantine_clients: int) -> None:
        super().__init__(byzantine_clients, selected=1)
