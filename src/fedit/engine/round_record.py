"""A round's metrics line (metrics.jsonl, and the record its checkpoint holds) and the
console line that reports it.

The line's keys come in a fixed order: round, objective, learning_rate, clients, strategy,
then each optional section a round has (selection, secure_aggregation, aggregator, attack,
rejected, dropped), then what the round loop adds (privacy, simulated_seconds and
simulated_clock, the held-out scores, seconds). Readers of metrics.jsonl rely on the keys,
not the order, but the order keeps lines of runs comparable line for line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedit.engine.runner import RoundPlan, RoundReplies
from fedit.types import Rejection

if TYPE_CHECKING:
    from fedit.server.strategies.base import Strategy


def round_record(
    plan: RoundPlan,
    replies: RoundReplies,
    clients: list[dict[str, Any]],
    rejected: list[Rejection],
    strategy: Strategy | None,
    attack: dict[str, Any],
) -> dict[str, Any]:
    """What a round did: its plan, its clients' records (with the bytes each moved), the
    strategy's and aggregator's metrics (`strategy`: None where it aggregated nothing),
    the attack, and who was rejected or dropped."""
    record: dict[str, Any] = {
        "round": plan.round_index + 1,
        "objective": plan.objective,
        "learning_rate": plan.learning_rate,
        "clients": [{**c, **replies.traffic.get(c["id"], {})} for c in clients],
        "strategy": strategy.metrics() if strategy is not None else {},
    }
    probed = {str(k): v for k, v in plan.probed.items()}  # JSON keys are strings
    sections = {  # None: the round has no such section
        "selection": {"probed_loss": probed} if probed else None,  # power_of_choice
        "secure_aggregation": None if replies.aggregate is None else replies.aggregate.record,
        "aggregator": None if strategy is None else strategy.aggregator.metrics() or None,
        "attack": dict(attack) if attack else None,
        "rejected": [r.as_record() for r in rejected] if rejected else None,
        "dropped": [r.as_record() for r in replies.dropped] if replies.dropped else None,
    }
    record.update({key: value for key, value in sections.items() if value is not None})
    return record


def round_line(record: dict[str, Any]) -> str:
    """The console's line for a committed round (or round 0, the starting model)."""
    text = f"round {record['round']}:"
    if record.get("clients"):
        losses = [c["train_loss"] for c in record["clients"]]
        name = "dpo loss" if record.get("objective") == "dpo" else "train loss"
        text += f" {name} {sum(losses) / len(losses):.4f}"
    if "heldout" in record:
        text += f" held-out loss {record['heldout']['overall']['loss']:.4f}"
    if "heldout_dpo" in record:
        overall = record["heldout_dpo"]["overall"]
        text += (
            f" held-out preference accuracy {overall['accuracy']:.3f}"
            f" margin {overall['margin']:.4f}"
        )
    for key in ("attack_success", "trigger_success"):
        if key in record.get("attack", {}):
            text += f" {key.replace('_', ' ')} {record['attack'][key]:.2f}"
    if "privacy" in record:
        privacy = record["privacy"]
        text += (
            f" ε {privacy['epsilon']:.3g} ({privacy['accountant'].upper()}, "
            f"δ {privacy['delta']:.2g})"
        )
    if record.get("dropped"):
        text += f" dropped {[d['client'] for d in record['dropped']]}"
    return text + (f" ({record['seconds']:.1f}s)" if "seconds" in record else "")
