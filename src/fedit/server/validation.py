"""Checks on client updates before any strategy sees them, the same in every engine.

An update is untrusted input: in a deployment it comes from another machine, and in an
experiment from a client the attack harness (fedit.client.attacks) turned hostile. One NaN
would make the global adapter NaN and poison a server optimiser's moments for the rest of
the run; one huge claimed num_examples would take over an examples-weighted mean; one
tensor of another shape would stop the round with a traceback. ``validate_updates`` runs
every check on a round's replies and splits them into the updates to aggregate and the
rejections (client id and reason, written under "rejected" in metrics.jsonl). The round
goes on with the rest, and no rejected update touches the global adapter or server state.

What each update must be comes from the coordinator's own knowledge (``RoundExpectations``:
the global adapter's keys, shapes and dtypes, the round's sampled clients and learning rate,
the steps a client of n records takes), never from the update itself. The wire decoder
(fedit.protocol.wire) checks the same structure earlier, as it must to build tensors at all;
these checks hold for updates that never crossed a wire too.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedit.errors import RunStopped
from fedit.ops.aggregation import state_norm, subtract
from fedit.types import AdapterState, ClientUpdate, Rejection


class AllUpdatesRejectedError(RunStopped):
    """Every client of a round was rejected: there is nothing to aggregate."""

    def __init__(self, round_number: int, rejections: Sequence[Rejection]) -> None:
        self.round_number, self.rejections = round_number, list(rejections)
        listed = "; ".join(f"client {r.client_id}: {r.reason}" for r in rejections)
        super().__init__(
            f"round {round_number}: every client was rejected ({listed}); lower "
            "train.learning_rate or check the data and model precision"
        )


@dataclass(frozen=True)
class RoundExpectations:
    """What every update of one round must be, from the coordinator's side.

    ``steps_for`` gives the optimizer steps a client that holds n records takes this round
    (fedit.client.trainer.steps_per_round); ``extras`` the extra tensor groups the strategy's
    client hook returns (SCAFFOLD's "control_delta"), each shaped like the adapter.
    """

    global_state: AdapterState
    clients: frozenset[int]
    learning_rate: float
    steps_for: Callable[[int], int]
    max_examples: int  # validation.max_examples
    max_update_norm: float | None  # validation.max_update_norm
    extras: frozenset[str] = frozenset()


def validate_updates(
    updates: Sequence[ClientUpdate], expected: RoundExpectations
) -> tuple[list[ClientUpdate], list[Rejection]]:
    """(updates to aggregate, rejections), in the order given. Two replies claiming one
    client are both rejected: nothing tells which is the client's."""
    claims = Counter(u.client_id for u in updates)
    kept, rejected = [], []
    for update in updates:
        if claims[update.client_id] > 1:
            reason = f"{claims[update.client_id]} updates claim this client"
        else:
            reason = rejection_reason(update, expected)
        if reason is None:
            kept.append(update)
        else:
            rejected.append(Rejection(update.client_id, reason))
    return kept, rejected


def rejection_reason(update: ClientUpdate, expected: RoundExpectations) -> str | None:
    """Why `update` cannot be aggregated, or None if it can. Cheap checks first, so a
    malformed update is refused before any arithmetic on its tensors."""
    if update.client_id not in expected.clients:
        return f"client {update.client_id!r} was not sampled this round"
    checks = (
        lambda: claims_reason(update, expected),
        lambda: non_finite_metric(update.metrics),
        lambda: structure_reason(update.state, expected.global_state, "state"),
        lambda: extras_reason(update.extras, expected),
        lambda: non_finite_reason(update),
        lambda: norm_reason(update.state, expected),
    )
    for check in checks:
        reason = check()
        if reason is not None:
            return reason
    return None


def claims_reason(update: ClientUpdate, expected: RoundExpectations) -> str | None:
    """num_examples an int in [1, max_examples], num_steps what that many records take this
    round, the learning rate the round's."""
    examples, steps, bound = update.num_examples, update.num_steps, expected.max_examples
    if not _is_int(examples) or not 1 <= examples <= bound:
        return f"num_examples {examples!r} is not an integer in [1, {bound}]"
    wanted = expected.steps_for(examples)
    if not _is_int(steps) or steps != wanted:
        return f"num_steps {steps!r}, expected {wanted}"
    if update.learning_rate != expected.learning_rate:
        return f"learning_rate {update.learning_rate!r}, the round's is {expected.learning_rate}"
    return None


def structure_reason(state: object, like: AdapterState, part: str) -> str | None:
    """Whether `state` is a dict of tensors with exactly `like`'s keys, shapes and dtypes."""
    if not isinstance(state, Mapping):
        return f"{part} is a {type(state).__name__}, not a dict of tensors"
    missing, extra = sorted(like.keys() - state.keys()), sorted(state.keys() - like.keys())
    if missing or extra:
        return f"{part} keys differ: missing {_few(missing)}, extra {_few(extra)}"
    for key, reference in like.items():
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor):
            return f"{part} {key} is a {type(tensor).__name__}, not a tensor"
        if tensor.shape != reference.shape:
            return (
                f"{part} {key} has shape {tuple(tensor.shape)}, expected {tuple(reference.shape)}"
            )
        if tensor.dtype != reference.dtype:
            return f"{part} {key} has dtype {tensor.dtype}, expected {reference.dtype}"
    return None


def extras_reason(extras: object, expected: RoundExpectations) -> str | None:
    """Exactly the strategy's extra groups, each shaped like the adapter."""
    if not isinstance(extras, Mapping):
        return f"extras is a {type(extras).__name__}, not a dict"
    if set(extras) != expected.extras:
        return f"extras {_few(sorted(map(str, extras)))}, expected {_few(sorted(expected.extras))}"
    for name in sorted(expected.extras):
        reason = structure_reason(extras[name], expected.global_state, f"extras.{name}")
        if reason is not None:
            return reason
    return None


def non_finite_reason(update: ClientUpdate) -> str | None:
    """Where the update holds a NaN or inf (its adapter or an extra), or None if nowhere."""
    parts = {"state": update.state} | {f"extras.{k}": v for k, v in update.extras.items()}
    for part, tensors in parts.items():
        for key, tensor in tensors.items():
            if not bool(torch.isfinite(tensor).all()):
                return f"non-finite values in {part} {key}"
    return None


def norm_reason(state: AdapterState, expected: RoundExpectations) -> str | None:
    """‖y_k − x‖ (global L2 over every adapter tensor) within validation.max_update_norm."""
    if expected.max_update_norm is None:
        return None
    norm, bound = state_norm(subtract(state, expected.global_state)), expected.max_update_norm
    if norm > bound:
        return f"update norm {norm:.4g} exceeds validation.max_update_norm {bound:g}"
    return None


def non_finite_metric(metrics: object) -> str | None:
    """Which metric is not a finite number (a bool or a list is not one), or None."""
    if not isinstance(metrics, Mapping):
        return f"metrics is a {type(metrics).__name__}, not a dict"
    for key, value in metrics.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            return f"metric {key} is not a number ({type(value).__name__})"
        if not math.isfinite(value):
            return f"metric {key} is not finite ({value!r})"
    return None


def _few(names: Sequence[str], shown: int = 3) -> str:
    listed = ", ".join(str(n)[:80] for n in names[:shown])
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"[{listed}{more}]"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
