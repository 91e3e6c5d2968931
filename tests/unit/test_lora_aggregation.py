"""LoRA-aware aggregation: separate-averaging error and the FedEx-LoRA residual."""

from __future__ import annotations

import pytest
import torch

from fedit.config import StrategyConfig
from fedit.ops.lora_aggregation import (
    exact_mean_delta_w,
    fedex_residual,
    lora_pairs,
    separate_error,
)
from fedit.server.strategies import Strategy, build_strategy
from fedit.types import AdapterState, ClientUpdate

Q = "base_model.model.model.layers.0.self_attn.q_proj"
V = "base_model.model.model.layers.0.self_attn.v_proj"


def lora(prefix: str, b: list[list[float]], a: list[list[float]]) -> AdapterState:
    return {
        f"{prefix}.lora_A.default.weight": torch.tensor(a),
        f"{prefix}.lora_B.default.weight": torch.tensor(b),
    }


# Two clients, r = 1, 2×2 weights. q_proj differs between them, v_proj is identical.
CLIENT_1 = lora(Q, b=[[1.0], [0.0]], a=[[1.0, 2.0]]) | lora(V, b=[[1.0], [1.0]], a=[[1.0, 0.0]])
CLIENT_2 = lora(Q, b=[[0.0], [1.0]], a=[[3.0, 4.0]]) | lora(V, b=[[1.0], [1.0]], a=[[1.0, 0.0]])
HALVES = [0.5, 0.5]


def test_lora_pairs_finds_modules() -> None:
    state = CLIENT_1 | {"base_model.model.lm_head.weight": torch.zeros(1)}
    assert lora_pairs(state) == {
        Q: (f"{Q}.lora_A.default.weight", f"{Q}.lora_B.default.weight"),
        V: (f"{V}.lora_A.default.weight", f"{V}.lora_B.default.weight"),
    }


def test_lora_pairs_needs_both_factors() -> None:
    with pytest.raises(ValueError, match="no matching"):
        lora_pairs({f"{Q}.lora_A.default.weight": torch.zeros(1, 2)})


def test_exact_mean_delta_w_by_hand() -> None:
    # q_proj: B_1A_1 = [[1, 2], [0, 0]], B_2A_2 = [[0, 0], [3, 4]];
    # s * (0.5*B_1A_1 + 0.5*B_2A_2) = 2 * [[0.5, 1], [1.5, 2]]
    delta_w = exact_mean_delta_w([CLIENT_1, CLIENT_2], HALVES, scaling=2.0)
    assert torch.equal(delta_w[Q], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_fedex_residual_by_hand() -> None:
    # B̄ = [[0.5], [0.5]], Ā = [[2, 3]] so B̄Ā = [[1, 1.5], [1, 1.5]];
    # R = s * ([[0.5, 1], [1.5, 2]] − B̄Ā) = 2 * [[-0.5, -0.5], [0.5, 0.5]]; v_proj: R = 0
    residual = fedex_residual([CLIENT_1, CLIENT_2], HALVES, scaling=2.0)
    assert sorted(residual) == [f"{Q}.base_layer.weight", f"{V}.base_layer.weight"]
    assert torch.equal(residual[f"{Q}.base_layer.weight"], torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    assert torch.equal(residual[f"{V}.base_layer.weight"], torch.zeros(2, 2))


def test_separate_error_by_hand() -> None:
    # q_proj: ‖[[-0.5, -0.5], [0.5, 0.5]]‖ / ‖[[0.5, 1], [1.5, 2]]‖ = 1 / sqrt(7.5) = 0.3651484
    error = separate_error([CLIENT_1, CLIENT_2], HALVES)
    assert error.per_module[Q] == pytest.approx(0.3651484)
    assert error.per_module[V] == 0.0  # identical clients
    assert error.max == pytest.approx(0.3651484)
    assert error.mean == pytest.approx(0.1825742)  # (0.3651484 + 0) / 2


def test_separate_error_is_zero_for_identical_clients() -> None:
    error = separate_error([CLIENT_1, CLIENT_1, CLIENT_1], [0.2, 0.3, 0.5])
    assert error.max == pytest.approx(0.0, abs=1e-6)


# --- strategies in "exact" and "separate" mode --------------------------------------------


def random_clients(seed: int = 0) -> list[ClientUpdate]:
    """3 clients, 2 modules (q: 4×3, v: 2×3), r = 2, sizes 1, 2, 5."""
    gen = torch.Generator().manual_seed(seed)
    updates = []
    for k, n in enumerate([1, 2, 5]):
        state = {}
        for prefix, out in ((Q, 4), (V, 2)):
            b = torch.randn(out, 2, generator=gen).tolist()
            a = torch.randn(2, 3, generator=gen).tolist()
            state |= lora(prefix, b=b, a=a)
        updates.append(ClientUpdate(k, state, n, 2, 0.1))
    return updates


def build(name: str, mode: str, scaling: float = 2.0) -> Strategy:
    strategy = build_strategy(StrategyConfig(name=name, lora_aggregation=mode), num_clients=3)
    strategy.lora_scaling = scaling  # alpha / r, e.g. 4 / 2
    return strategy


def zero_adapter(updates: list[ClientUpdate]) -> AdapterState:
    return {key: torch.zeros_like(t) for key, t in updates[0].state.items()}


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_exact_mode_merged_weights_equal_the_mean_client_update(name: str) -> None:
    # Prepare
    updates = random_clients()
    base = {Q: torch.ones(4, 3), V: torch.full((2, 3), -2.0)}  # W0 per module
    weights = [1 / 8, 2 / 8, 5 / 8]
    strategy = build(name, "exact", scaling=2.0)

    # Execute
    new_state = strategy.aggregate(zero_adapter(updates), updates, round_index=0)
    residual = strategy.take_base_residual()

    # Assert: W0 + R + s·B_new A_new = W0 + Σ p_k s·B_k A_k
    target = exact_mean_delta_w([u.state for u in updates], weights, scaling=2.0)
    for prefix, (a_key, b_key) in lora_pairs(new_state).items():
        merged = base[prefix] + residual[prefix + ".base_layer.weight"]
        merged = merged + 2.0 * new_state[b_key] @ new_state[a_key]
        assert torch.allclose(merged, base[prefix] + target[prefix], atol=1e-5)
    assert strategy.take_base_residual() == {}  # taken, so cleared


def test_exact_mode_residual_accumulates_until_taken() -> None:
    updates = random_clients()
    strategy = build("fedavg", "exact")
    once = fedex_residual([u.state for u in updates], [1 / 8, 2 / 8, 5 / 8], 2.0)
    strategy.aggregate(zero_adapter(updates), updates, 0)
    strategy.aggregate(zero_adapter(updates), updates, 1)
    residual = strategy.take_base_residual()
    assert all(torch.allclose(residual[key], 2 * r) for key, r in once.items())


def test_server_optimisers_use_the_client_factor_residual() -> None:
    updates = random_clients()
    strategy = build("fedadam", "exact")
    strategy.aggregate(zero_adapter(updates), updates, 0)
    expected = fedex_residual([u.state for u in updates], [1 / 8, 2 / 8, 5 / 8], 2.0)
    residual = strategy.take_base_residual()
    assert all(torch.allclose(residual[key], r) for key, r in expected.items())


@pytest.mark.parametrize("mode", ["separate", "exact"])
def test_separate_error_is_reported_in_both_modes(mode: str) -> None:
    # Prepare
    differing = random_clients()
    identical = [ClientUpdate(k, differing[0].state, 1, 2, 0.1) for k in range(3)]
    strategy = build("fedavg", mode)

    # Execute
    strategy.aggregate(zero_adapter(differing), differing, 0)
    after_differing = strategy.metrics()
    strategy.aggregate(zero_adapter(identical), identical, 1)
    after_identical = strategy.metrics()

    # Assert
    assert after_differing["lora_rel_error_max"] > after_differing["lora_rel_error_mean"] > 0
    assert after_identical["lora_rel_error_max"] == pytest.approx(0.0, abs=1e-6)
    assert (strategy.take_base_residual() == {}) == (mode == "separate")
