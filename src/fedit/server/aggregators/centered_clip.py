"""Centred clipping (Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust
Optimization", ICML 2021, the CClip aggregator)."""

from __future__ import annotations

import statistics

from torch import Tensor

from fedit.ops.aggregation import (
    _check_keys,
    _wide,
    add_prefix,
    add_scaled,
    client_deltas,
    clip_to_norm,
    state_norm,
    subtract,
    take_prefix,
    weighted_mean,
    zeros_like,
)
from fedit.server.aggregators.robust import RobustAggregator, ids
from fedit.types import AdapterState, ClientUpdate

CENTER = "center"  # the state_dict prefix of v


def centered_clip(
    deltas: list[AdapterState],
    weights: list[float],
    center: AdapterState,
    tau: float,
    iterations: int,
) -> tuple[AdapterState, list[int]]:
    """v_L from v_0 = ``center`` by L = ``iterations`` steps of

        v_{l+1} = v_l + Σ_k p_k clip_τ(Δ_k − v_l),   clip_τ(z) = z · min(1, τ / ‖z‖),

    and the indices of the updates clipped in any step (‖Δ_k − v_l‖ > τ).

    Each update pulls the centre by at most p_k·τ per step, so f Byzantine updates move it
    by at most τ·Σ_{k bad} p_k however large they are, while honest updates within τ of v
    count in full (the plain mean when every one is). The paper starts v at the previous
    round's aggregate (its "history"), uses the uniform 1/n for p_k and proves robustness
    for L large enough; fedit uses the p_k of ``weighting`` (``"uniform"`` is the paper's;
    "examples" trusts the clients' declared counts). ‖·‖ is the L2 norm over all tensors.
    Float32 (float64 kept); the inputs are not modified.
    """
    if iterations < 1:
        raise ValueError(f"centred clipping needs at least one iteration, got {iterations}")
    _check_keys(center, deltas)
    v = {key: _wide(t) for key, t in center.items()}
    clipped: set[int] = set()
    for _ in range(iterations):
        steps = []
        for index, delta in enumerate(deltas):
            step, distance = clip_to_norm(subtract(delta, v), tau)
            steps.append(step)
            if distance > tau:
                clipped.add(index)
        v = add_scaled(v, weighted_mean(steps, weights), 1.0)
    return v, sorted(clipped)


class CenteredClipAggregator(RobustAggregator):
    """Δ = centred clipping of the Δ_k from v_0 = the previous round's Δ (zero in the first
    round, and again after ``reset``), τ = ``tau`` and L = ``iterations``. τ unset: the median
    over the round's updates of ‖Δ_k − v_0‖ (fedit's default, not the paper's fixed τ: scale-
    free, and a minority cannot raise it beyond the honest distances). v is the aggregator's
    state ("center.<param>"), checkpointed with the strategy's, so --resume continues with
    the same centre. Metrics: τ, the clipped client ids and the largest ‖Δ_k − v_0‖."""

    name = "centered_clip"

    def __init__(self, tau: float | None, iterations: int) -> None:
        super().__init__()
        self.tau, self.iterations = tau, iterations
        self._center: AdapterState = {}

    def delta(self, global_state, updates: list[ClientUpdate], weights, round_index):
        deltas = client_deltas(global_state, updates)
        center = self._center or zeros_like(global_state)
        distances = [state_norm(subtract(d, center)) for d in deltas]
        tau = self.tau if self.tau is not None else statistics.median(distances)
        aggregate, clipped = centered_clip(deltas, weights, center, tau, self.iterations)
        self._center = {key: t.clone() for key, t in aggregate.items()}
        self._metrics = {
            "tau": tau,
            "clipped": ids(updates, clipped),
            "distance_max": max(distances),
        }
        return aggregate

    def state_dict(self) -> dict[str, Tensor]:
        return add_prefix(self._center, CENTER)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        unknown = sorted(k for k in state if not k.startswith(CENTER + "."))
        if unknown:
            raise ValueError(f"aggregator {self.name!r} keeps only its centre, got {unknown[:3]}")
        self._center = take_prefix(state, CENTER)
