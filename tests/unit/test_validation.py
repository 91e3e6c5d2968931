"""Server-side rejection of client updates that hold NaN or inf."""

import pytest
import torch

from fedit.server.validation import (
    AllUpdatesRejectedError,
    Rejection,
    check_update,
    reject_non_finite,
)
from fedit.types import ClientUpdate


def update(client_id: int, w: list[float], control: list[float] | None = None) -> ClientUpdate:
    extras = {} if control is None else {"control_delta": {"w": torch.tensor(control)}}
    return ClientUpdate(client_id, {"w": torch.tensor(w)}, 3, 2, 0.1, extras)


def test_non_finite_adapters_and_extras_are_rejected_with_a_reason() -> None:
    updates = [
        update(0, [1.0, 2.0], [0.5, 0.5]),
        update(1, [1.0, float("nan")]),
        update(2, [1.0, 2.0], [float("inf"), 0.0]),
        update(3, [0.0, -1.0]),
    ]
    kept, rejected = reject_non_finite(updates)
    assert [u.client_id for u in kept] == [0, 3]
    assert rejected == [
        Rejection(1, "non-finite values in state w"),
        Rejection(2, "non-finite values in extras.control_delta w"),
    ]
    assert rejected[0].as_record() == {"client": 1, "reason": "non-finite values in state w"}
    assert kept[0] is updates[0]  # passed through untouched


def test_the_all_rejected_error_names_the_round_and_clients() -> None:
    err = AllUpdatesRejectedError(4, [Rejection(1, "x"), Rejection(3, "y")])
    with pytest.raises(ValueError, match=r"round 4: every client was rejected \(client 1: x; "):
        raise err


def claiming(**fields: object) -> ClientUpdate:
    """A clean update (10 examples, 3 steps, two metrics) with `fields` replaced."""
    good = ClientUpdate(7, {"w": torch.tensor([1.0])}, 10, 3, 0.1)
    good.metrics = {"train_loss": 0.5, "label_tokens": 40}
    for name, value in fields.items():
        setattr(good, name, value)
    return good


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"num_examples": 0}, "num_examples 0 is not an integer in [1, 1000000000]"),
        ({"num_examples": -4}, "num_examples -4 is not an integer in [1, 1000000000]"),
        ({"num_examples": 10**12}, "num_examples 1000000000000 is not an integer in [1, "),
        ({"num_examples": 10.0}, "num_examples 10.0 is not an integer"),
        ({"num_examples": True}, "num_examples True is not an integer"),
        ({"num_steps": 2}, "num_steps 2, expected 3"),
        ({"num_steps": 4}, "num_steps 4, expected 3"),
        ({"num_steps": 3.0}, "num_steps 3.0, expected 3"),
        ({"metrics": {"train_loss": float("nan")}}, "metric train_loss is not finite (nan)"),
        ({"metrics": {"seconds": float("-inf")}}, "metric seconds is not finite (-inf)"),
        ({"metrics": {"steps": [1, 2]}}, "metric steps is not a number (list)"),
        ({"metrics": {"steps": False}}, "metric steps is not a number (bool)"),
    ],
)
def test_check_update_names_what_a_reply_claims_wrongly(fields: dict, reason: str) -> None:
    rejection = check_update(claiming(**fields), expected_steps=3)
    assert rejection is not None and rejection.client_id == 7
    assert rejection.reason.startswith(reason)


def test_check_update_passes_a_clean_update_and_leaves_tensors_to_reject_non_finite() -> None:
    assert check_update(claiming(), expected_steps=3) is None
    assert check_update(claiming(num_examples=10**9), expected_steps=3) is None
    assert check_update(claiming(num_examples=11), expected_steps=3, max_examples=10) is not None
    nan_state = claiming(state={"w": torch.tensor([float("nan")])})
    assert check_update(nan_state, expected_steps=3) is None
    assert reject_non_finite([nan_state])[1] == [Rejection(7, "non-finite values in state w")]
