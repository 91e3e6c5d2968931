"""What the robust aggregators share: how many updates a rule needs, and its metrics.

A robust rule tolerates only so many bad updates among n (Krum: n ≥ 2f + 3; a trimmed mean:
more than twice the number trimmed). ``too_few`` says why n is not enough, once for the
configured clients per round (a ConfigError before anything is trained, see
``fedit.server.aggregators.build_aggregator``) and again in every round, whose n can be
smaller (updates rejected, deployment clients that did not reply): such a round stops the
run with ``TooFewUpdatesError`` rather than quietly aggregating without the guarantee the
user asked for.
"""

from __future__ import annotations

from typing import Any

from fedit.errors import RunStopped
from fedit.ops.aggregation import state_norm, subtract
from fedit.server.aggregators.base import Aggregator
from fedit.types import AdapterState, ClientUpdate


class TooFewUpdatesError(RunStopped):
    """A round has fewer updates than its robust rule needs: the round is not committed."""

    def __init__(self, round_number: int, why: str) -> None:
        super().__init__(
            f"round {round_number}: {why}; the rounds before it are saved (--resume retries "
            "the round, e.g. once more deployment clients reply)"
        )


class RobustAggregator(Aggregator):
    """Base of the robust rules: a per-round count check and the last round's metrics."""

    def __init__(self) -> None:
        self._metrics: dict[str, Any] = {}

    def too_few(self, n: int) -> str | None:
        """Why n updates are too few for this rule (a sentence naming the numbers and the
        config field), or None when they are enough."""
        return None

    def check_count(self, n: int, round_index: int) -> None:
        """Stop the round (0-based ``round_index``) when it has too few updates."""
        why = self.too_few(n)
        if why is not None:
            raise TooFewUpdatesError(round_index + 1, why)

    def metrics(self) -> dict[str, Any]:
        return dict(self._metrics)


def distances_to(
    aggregate: AdapterState, deltas: list[AdapterState], updates: list[ClientUpdate]
) -> dict[str, float]:
    """{client id: ‖Δ_k − Δ‖}: how far each update lies from the round's aggregate (an
    outlier stands out in metrics.jsonl)."""
    return {
        str(u.client_id): state_norm(subtract(d, aggregate))
        for u, d in zip(updates, deltas, strict=True)
    }


def ids(updates: list[ClientUpdate], indices: list[int]) -> list[int]:
    """The client ids of the updates at ``indices``."""
    return [updates[i].client_id for i in indices]
