"""Central DP-FedAvg: the clipped, noised mean of the clients' deltas."""

from __future__ import annotations

from typing import Any

from fedit.ops.aggregation import clip_to_norm, subtract
from fedit.privacy.mechanism import dp_mean, gaussian_noise
from fedit.privacy.plan import PrivacyPlan
from fedit.seeding import Stream
from fedit.server.aggregators.base import Aggregator
from fedit.types import AdapterState


class DPFedAvgAggregator(Aggregator):
    """DP-FedAvg with a fixed denominator (McMahan et al., "Learning Differentially Private
    Recurrent Language Models", ICLR 2018, Algorithm 1 with uniform client weights):

        Δ = (Σ_k clip(Δ_k, C) + N(0, σ²C²·I)) / m,   clip(Δ_k, C) = Δ_k · min(1, C/‖Δ_k‖),

    ‖·‖ the global L2 norm over all adapter tensors and m the round's planned number of
    sampled clients (federation.clients_per_round or fraction): fixed and public, not the
    number that replied, so a client that was rejected or dropped contributes zero and its
    absence does not change the scale. The p_k of ``weighting`` are ignored (the config
    requires "uniform": record counts are private). The strategy then steps with Δ as with
    any aggregator: post-processing, so FedAvgM or FedAdam on top keep the guarantee.

    The noise seed comes from the OS per round, or from (run seed, round) with
    privacy.reproducible_noise. No state across rounds.
    """

    name = "dp_fedavg"

    def __init__(self, plan: PrivacyPlan) -> None:
        self.plan = plan
        self._metrics: dict[str, Any] = {}

    def delta(self, global_state, updates, weights, round_index) -> AdapterState:
        plan = self.plan
        clipped, norms = [], []
        for update in updates:
            delta, norm = clip_to_norm(subtract(update.state, global_state), plan.clip_norm)
            clipped.append(delta)
            norms.append(norm)
        seed = plan.noise_seed(Stream.CENTRAL_NOISE, round_index)
        noise = gaussian_noise(clipped[0], plan.noise_std, seed)
        self._metrics = {
            "clipped": [
                u.client_id for u, n in zip(updates, norms, strict=True) if n > plan.clip_norm
            ],
            "update_norms": norms,
            "denominator": plan.sampled,
        }
        return dp_mean(clipped, noise, plan.sampled)

    def metrics(self) -> dict[str, Any]:
        """Which clients' deltas were clipped, every delta's norm before clipping (in the
        order of the round's "clients"), and m. These are the server's own facts about the
        un-noised updates: central DP trusts the server, so they are in its log, which the
        guarantee does not cover (publish the adapter, not the run directory)."""
        return dict(self._metrics)
