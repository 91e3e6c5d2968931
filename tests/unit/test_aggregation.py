"""Aggregation maths against hand-computed values (Prepare / Execute / Assert)."""

from __future__ import annotations

import pytest
import torch

from fedit.ops.aggregation import (
    add_prefix,
    add_scaled,
    client_deltas,
    client_weights,
    state_norm,
    take_prefix,
    weighted_mean,
    zeros_like,
)
from fedit.types import ClientUpdate


def update(values: list, n: int, client_id: int = 0) -> ClientUpdate:
    state = {"w": torch.tensor(values)}
    return ClientUpdate(client_id, state, num_examples=n, num_steps=1, learning_rate=0.1)


def test_client_weights_by_examples_and_uniform() -> None:
    # Prepare
    updates = [update([[0.0]], n=1), update([[0.0]], n=3)]

    # Execute / Assert: 1/(1+3), 3/(1+3); uniform 1/2 each
    assert client_weights(updates, "examples") == [0.25, 0.75]
    assert client_weights(updates, "uniform") == [0.5, 0.5]


def test_client_weights_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no client updates"):
        client_weights([], "examples")
    with pytest.raises(ValueError, match="num_examples > 0"):
        client_weights([update([[0.0]], n=0)], "examples")
    with pytest.raises(ValueError, match="unknown weighting"):
        client_weights([update([[0.0]], n=1)], "size")


def test_weighted_mean_2x3() -> None:
    # Prepare
    a = {"w": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])}
    b = {"w": torch.tensor([[5.0, 6.0, 7.0], [8.0, 9.0, 10.0]])}

    # Execute
    mean = weighted_mean([a, b], [0.25, 0.75])

    # Assert: 0.25*1 + 0.75*5 = 4, 0.25*2 + 0.75*6 = 5, ... each entry 3 above a's
    assert torch.equal(mean["w"], torch.tensor([[4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]))


def test_weighted_mean_keeps_dtype_and_checks_keys() -> None:
    a = {"w": torch.tensor([1.0, 3.0], dtype=torch.bfloat16)}
    assert weighted_mean([a, a], [0.5, 0.5])["w"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="different keys"):
        weighted_mean([a, {"v": a["w"]}], [0.5, 0.5])
    with pytest.raises(ValueError, match="one weight per state"):
        weighted_mean([a], [0.5, 0.5])


def test_weighted_mean_of_client_deltas_weighted_and_uniform() -> None:
    # Prepare
    x = {"w": torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])}
    updates = [
        update([[2.0, 1.0, 0.0], [4.0, 0.0, 0.0]], n=1),  # Δ_1 = [[1, 0, -1], [4, 0, 0]]
        update([[1.0, 3.0, 1.0], [0.0, 0.0, 8.0]], n=3),  # Δ_2 = [[0, 2, 0], [0, 0, 8]]
    ]

    # Execute
    deltas = client_deltas(x, updates)
    weighted = weighted_mean(deltas, client_weights(updates, "examples"))
    uniform = weighted_mean(deltas, client_weights(updates, "uniform"))

    # Assert: 0.25*Δ_1 + 0.75*Δ_2 and 0.5*Δ_1 + 0.5*Δ_2
    assert torch.equal(weighted["w"], torch.tensor([[0.25, 1.5, -0.25], [1.0, 0.0, 6.0]]))
    assert torch.equal(uniform["w"], torch.tensor([[0.5, 1.0, -0.5], [2.0, 0.0, 4.0]]))


def test_functions_do_not_modify_inputs() -> None:
    # Prepare
    x = {"w": torch.tensor([1.0, 2.0])}
    updates = [update([3.0, 4.0], n=1), update([5.0, 6.0], n=1)]
    before = [x["w"].clone()] + [u.state["w"].clone() for u in updates]

    # Execute
    client_deltas(x, updates)
    weighted_mean([u.state for u in updates], [0.5, 0.5])
    add_scaled(x, x, 2.0)

    # Assert
    after = [x["w"]] + [u.state["w"] for u in updates]
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))


def test_add_scaled_norm_zeros_and_prefixes() -> None:
    x = {"w": torch.tensor([3.0, 0.0]), "u": torch.tensor([[0.0]])}
    step = {"w": torch.tensor([0.0, 2.0]), "u": torch.tensor([[1.0]])}
    # [3 + 2*0, 0 + 2*2] and [0 + 2*1]
    assert torch.equal(add_scaled(x, step, 2.0)["w"], torch.tensor([3.0, 4.0]))
    assert state_norm(add_scaled(x, step, 2.0)) == pytest.approx(5.385164807)  # sqrt(9+16+4)
    assert torch.equal(zeros_like(x, fill=0.5)["u"], torch.tensor([[0.5]]))
    flat = add_prefix(x, "v")
    assert sorted(flat) == ["v.u", "v.w"]
    assert torch.equal(take_prefix(flat | {"m.w": x["w"]}, "v")["w"], x["w"])
