"""Server-side rejection of client updates that hold NaN or inf."""

import pytest
import torch

from fedit.server.validation import AllUpdatesRejectedError, Rejection, reject_non_finite
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
