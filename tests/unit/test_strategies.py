"""Every strategy against hand-worked numbers, plus registry, resume and purity checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedit.client.hooks import ClientHook, FedProxHook, make_hook
from fedit.config import ConfigError, StrategyConfig
from fedit.engine.checkpoint import ClientStateStore
from fedit.server.strategies import STRATEGIES, Strategy, build_strategy, register
from fedit.server.strategies.scaffold import WEIGHT_KEY
from fedit.types import AdapterState, ClientUpdate


def build(name: str, num_clients: int = 4, **options: object) -> Strategy:
    return build_strategy(StrategyConfig(name=name, **options), num_clients)


def hook_of(strategy: Strategy, client_id: int, x: AdapterState) -> ClientHook:
    """The hook a client builds from the strategy's instructions, as both engines do."""
    return make_hook(strategy.client_instructions(client_id, x))


Values = list[float] | list[list[float]]  # what torch.tensor takes here


def updates_for(
    x: AdapterState, deltas: list[Values], ns: list[int] | None = None, ids: list[int] | None = None
) -> list[ClientUpdate]:
    """Clients whose adapters are y_k = x + Δ_k (one tensor "w")."""
    ns, ids = ns or [1] * len(deltas), ids or list(range(len(deltas)))
    return [
        ClientUpdate(cid, {"w": x["w"] + torch.tensor(d)}, n, num_steps=2, learning_rate=0.1)
        for d, n, cid in zip(deltas, ns, ids, strict=True)
    ]


def step(
    strategy: Strategy, x: AdapterState, deltas: list[Values], ns: list[int] | None = None
) -> AdapterState:
    return strategy.aggregate(x, updates_for(x, deltas, ns), round_index=0)


def w(values: list[float]) -> AdapterState:
    return {"w": torch.tensor(values)}


# --- registry ---------------------------------------------------------------------------


def test_registry_builds_every_strategy_by_name() -> None:
    names = {"fedavg", "fedprox", "scaffold", "fedavgm", "fedadagrad", "fedyogi", "fedadam"}
    assert set(STRATEGIES) == names
    for name in names:
        assert type(build(name)) is STRATEGIES[name]


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown strategy 'fedsgd' \(known: fedadagrad, "):
        build("fedsgd")


def test_register_refuses_a_duplicate_name() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register("fedavg")(STRATEGIES["fedavg"])


# --- FedAvg / FedProx -------------------------------------------------------------------


def test_fedavg_is_the_weighted_mean() -> None:
    # Prepare
    x = {"w": torch.zeros(2, 3)}
    deltas = [[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [[5.0, 6.0, 7.0], [8.0, 9.0, 10.0]]]

    # Execute
    strategy = build("fedavg")
    weighted = step(strategy, x, deltas, ns=[1, 3])
    uniform = step(build("fedavg", weighting="uniform"), x, deltas, ns=[1, 3])

    # Assert: 0.25*y_1 + 0.75*y_2 (each entry 3 above y_1); uniform 0.5*y_1 + 0.5*y_2
    assert torch.equal(weighted["w"], torch.tensor([[4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]))
    assert torch.equal(uniform["w"], torch.tensor([[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]))
    # sqrt(4² + 5² + 6² + 7² + 8² + 9²) = sqrt(271)
    assert strategy.metrics()["update_norm"] == pytest.approx(271**0.5)


def test_fedprox_with_mu_zero_is_fedavg() -> None:
    x = w([1.0, -1.0])
    deltas = [[0.5, 2.0], [-1.0, 4.0]]
    prox = build("fedprox", prox_mu=0.0)
    assert type(hook_of(prox, 0, x)) is ClientHook  # the hook adds nothing
    assert torch.equal(
        step(prox, x, deltas, [2, 3])["w"], step(build("fedavg"), x, deltas, [2, 3])["w"]
    )


def test_fedprox_term_value_and_gradient() -> None:
    # Prepare: x = [0, 1] at start, then local training moved θ to [1, 3]
    theta = torch.nn.Parameter(torch.tensor([0.0, 1.0]))
    hook = hook_of(build("fedprox", prox_mu=0.5), 0, w([0.0, 1.0]))
    assert isinstance(hook, FedProxHook)
    hook.start({"w": theta})
    with torch.no_grad():
        theta.copy_(torch.tensor([1.0, 3.0]))

    # Execute
    term = hook.loss_term({"w": theta})
    term.backward()

    # Assert: μ/2 ‖θ − x‖² = 0.25 * (1² + 2²) = 1.25; gradient μ(θ − x) = 0.5 * [1, 2]
    assert term.item() == pytest.approx(1.25)
    assert torch.allclose(theta.grad, torch.tensor([0.5, 1.0]))


# --- FedAvgM ----------------------------------------------------------------------------


def test_fedavgm_without_momentum_is_fedavg() -> None:
    x = w([1.0, -1.0, 0.5])
    deltas = [[0.5, 2.0, -1.0], [-1.0, 4.0, 0.25]]
    avgm = build("fedavgm", server_momentum=0.0, server_lr=1.0)
    expected = step(build("fedavg"), x, deltas, [2, 3])["w"]
    assert torch.allclose(step(avgm, x, deltas, [2, 3])["w"], expected, atol=1e-6)


def test_fedavgm_three_rounds_carry_velocity() -> None:
    # Prepare: β = 0.5, η_s = 2
    strategy = build("fedavgm", server_momentum=0.5, server_lr=2.0)
    x0 = w([0.0, 0.0])

    # Execute
    x1 = step(strategy, x0, [[1.0, 2.0]])  # v1 = [1, 2]; x1 = 0 + 2*v1 = [2, 4]
    x2 = step(strategy, x1, [[-1.0, 1.0]])  # v2 = 0.5*[1, 2] + [-1, 1] = [-0.5, 2]; x2 = [1, 8]
    x3 = step(strategy, x2, [[2.0, 0.0]])  # v3 = [-0.25, 1] + [2, 0] = [1.75, 1]; x3 = [4.5, 10]

    # Assert
    assert torch.equal(x1["w"], torch.tensor([2.0, 4.0]))
    assert torch.equal(x2["w"], torch.tensor([1.0, 8.0]))
    assert torch.equal(x3["w"], torch.tensor([4.5, 10.0]))
    assert torch.equal(strategy.state_dict()["v.w"], torch.tensor([1.75, 1.0]))


# --- FedAdagrad / FedYogi / FedAdam (β1 = 0.5 throughout) --------------------------------


def test_fedadagrad_two_rounds() -> None:
    # Prepare: τ = 0.75, so v0 = τ² = 0.5625
    strategy = build("fedadagrad", server_lr=1.0, beta1=0.5, tau=0.75)
    x0 = w([0.0])

    # Execute
    # m1 = 0.5*1 = 0.5; v1 = 0.5625 + 1 = 1.5625 (√ 1.25); x1 = 0.5 / (1.25 + 0.75) = 0.25
    x1 = step(strategy, x0, [[1.0]])
    # m2 = 0.25 - 1.5 = -1.25; v2 = 1.5625 + 9 = 10.5625 (√ 3.25); x2 = 0.25 - 1.25/4 = -0.0625
    x2 = step(strategy, x1, [[-3.0]])

    # Assert
    assert x1["w"].item() == pytest.approx(0.25)
    assert x2["w"].item() == pytest.approx(-0.0625)
    assert strategy.state_dict()["v.w"].item() == pytest.approx(10.5625)


def test_fedyogi_three_rounds_grow_then_shrink_v() -> None:
    # Prepare: β2 = 0.5, τ = 0.25, so v0 = 0.0625
    strategy = build("fedyogi", server_lr=1.0, beta1=0.5, beta2=0.5, tau=0.25)
    x0 = w([0.0])

    # Execute
    # Δ=1: m1 = 0.5; v0 < Δ² so v1 = 0.0625 + 0.5*1 = 0.5625 (√ 0.75); x1 = 0.5/1 = 0.5
    x1 = step(strategy, x0, [[1.0]])
    # Δ=-3: m2 = 0.25 - 1.5 = -1.25; v2 = 0.5625 + 0.5*9 = 5.0625 (√ 2.25); x2 = 0.5 - 1.25/2.5 = 0
    x2 = step(strategy, x1, [[-3.0]])
    # Δ=2: m3 = -0.625 + 1 = 0.375; v2 > Δ² so v3 = 5.0625 - 0.5*4 = 3.0625 (√ 1.75);
    # x3 = 0 + 0.375/2 = 0.1875
    x3 = step(strategy, x2, [[2.0]])

    # Assert
    assert x1["w"].item() == pytest.approx(0.5)
    assert x2["w"].item() == pytest.approx(0.0, abs=1e-7)
    assert x3["w"].item() == pytest.approx(0.1875)
    assert strategy.state_dict()["v.w"].item() == pytest.approx(3.0625)
    assert strategy.state_dict()["m.w"].item() == pytest.approx(0.375)


def test_fedadam_two_rounds_with_weighted_delta() -> None:
    # Prepare: β2 = 0.8, τ = 0.5 (v0 = 0.25); two clients with n = 1 and 3
    strategy = build("fedadam", server_lr=1.0, beta1=0.5, beta2=0.8, tau=0.5)
    x0 = w([0.0])

    # Execute
    # Δ1 = 0.25*(-1) + 0.75*3 = 2 (the unweighted mean would be 1)
    # m1 = 1; v1 = 0.8*0.25 + 0.2*4 = 1; x1 = 1 / (1 + 0.5) = 2/3
    x1 = step(strategy, x0, [[-1.0], [3.0]], ns=[1, 3])
    # Δ2 = 0.25*1 + 0.75*5 = 4; m2 = 0.5 + 2 = 2.5; v2 = 0.8 + 0.2*16 = 4; x2 = 2/3 + 2.5/2.5
    x2 = step(strategy, x1, [[1.0], [5.0]], ns=[1, 3])

    # Assert
    assert x1["w"].item() == pytest.approx(2 / 3)
    assert x2["w"].item() == pytest.approx(5 / 3)
    assert strategy.state_dict()["v.w"].item() == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("name", "v_from_delta", "v_from_momentum"),
    [
        # τ = 0.5 (v0 = 0.25), β1 = 0.5, β2 = 0.8, Δ = 2 so m = 1: Δ² = 4 but m² = 1
        ("fedadagrad", 4.25, 1.25),  # 0.25 + 4   vs 0.25 + 1
        ("fedyogi", 1.05, 0.45),  # 0.25 + 0.2*4   vs 0.25 + 0.2*1 (v0 < Δ²: sign −1)
        ("fedadam", 1.0, 0.4),  # 0.8*0.25 + 0.2*4   vs 0.8*0.25 + 0.2*1
    ],
)
def test_adaptive_second_moment_uses_delta_squared_not_momentum_squared(
    name: str, v_from_delta: float, v_from_momentum: float
) -> None:
    strategy = build(name, server_lr=1.0, beta1=0.5, beta2=0.8, tau=0.5)
    step(strategy, w([0.0]), [[2.0]])
    v = strategy.state_dict()["v.w"].item()
    assert v == pytest.approx(v_from_delta)
    assert v != pytest.approx(v_from_momentum)


# --- SCAFFOLD ---------------------------------------------------------------------------


def scaffold_with(c: list[float], c_0: list[float], num_clients: int = 4) -> Strategy:
    strategy = build("scaffold", num_clients=num_clients)
    state = {"c.w": torch.tensor(c), "c_k.0.w": torch.tensor(c_0)}
    seen = {"weight_sum": torch.tensor(1.0), "clients_seen": torch.tensor(1)}
    # client 0 seen, with one example
    strategy.load_state_dict(state | seen | {f"c_k.0.{WEIGHT_KEY}": torch.tensor(1.0)})
    return strategy


def test_scaffold_hook_corrects_gradients() -> None:
    # Prepare: c = [1, 2], c_0 = [0.5, -1]
    hook = hook_of(scaffold_with([1.0, 2.0], [0.5, -1.0]), 0, w([0.0, 0.0]))
    used = torch.nn.Parameter(torch.zeros(2))
    hook.start({"w": used})
    used.grad = torch.tensor([3.0, 3.0])

    # Execute
    hook.adjust_gradients({"w": used})

    # Assert: g − c_0 + c = [3 - 0.5 + 1, 3 + 1 + 2]
    assert torch.equal(used.grad, torch.tensor([3.5, 6.0]))


def test_scaffold_corrects_a_missing_gradient_too() -> None:
    hook = hook_of(scaffold_with([1.0, 2.0], [0.5, -1.0]), 0, w([0.0, 0.0]))
    unused = torch.nn.Parameter(torch.zeros(2))
    hook.start({"w": unused})
    hook.adjust_gradients({"w": unused})
    assert torch.equal(unused.grad, torch.tensor([0.5, 3.0]))  # 0 − c_0 + c


def test_scaffold_control_delta_equals_option_ii_under_sgd() -> None:
    # Prepare: c = [1, 2], c_0 = [0.5, -1], x = [0, 0], plain SGD with η_l = 0.1, K = 2
    hook = hook_of(scaffold_with([1.0, 2.0], [0.5, -1.0]), 0, w([0.0, 0.0]))
    theta = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([theta], lr=0.1)
    hook.start({"w": theta})

    # Execute: raw gradients g1 = [1, 2], g2 = [3, 0]
    for raw in ([1.0, 2.0], [3.0, 0.0]):
        theta.grad = torch.tensor(raw)
        hook.adjust_gradients({"w": theta})
        optimizer.step()
    extras = hook.finish({"w": theta}, num_steps=2, learning_rate=0.1)

    # Assert: corrected [1.5, 5] and [3.5, 3]; y = -0.1 * [5, 8] = [-0.5, -0.8]
    assert torch.allclose(theta.detach(), torch.tensor([-0.5, -0.8]))
    # option II: c_0⁺ = c_0 − c + (x − y)/(Kη) = [-0.5, -3] + [2.5, 4] = [2, 1] = mean(g1, g2)
    # control delta = c_0⁺ − c_0 = [2, 1] − [0.5, -1] = [1.5, 2]
    assert torch.allclose(extras["control_delta"]["w"], torch.tensor([1.5, 2.0]))


def scaffold_updates(
    x: AdapterState,
    deltas: list[Values],
    ns: list[int],
    ids: list[int],
    control_deltas: list[Values],
) -> list[ClientUpdate]:
    updates = updates_for(x, deltas, ns, ids)
    for update, control_delta in zip(updates, control_deltas, strict=True):
        update.extras = {"control_delta": {"w": torch.tensor(control_delta)}}
    return updates


def test_scaffold_two_rounds_server_state() -> None:
    # Prepare: N = 4 clients, η_g = 0.5, the paper's uniform weights
    strategy = build("scaffold", num_clients=4, server_lr=0.5, weighting="uniform")
    x0 = w([0.0, 0.0])

    # Execute, round 1: clients 0 (n=1) and 2 (n=3)
    round_1 = scaffold_updates(
        x0, [[1.0, 0.0], [0.0, 2.0]], [1, 3], [0, 2], [[4.0, 0.0], [0.0, 8.0]]
    )
    x1 = strategy.aggregate(x0, round_1, round_index=0)
    state_1 = strategy.state_dict()
    hook_0, hook_1 = hook_of(strategy, 0, x1), hook_of(strategy, 1, x1)
    # round 2: client 0 alone, Δ = [2, 2], control delta [-4, 4]
    round_2 = scaffold_updates(x1, [[2.0, 2.0]], [1], [0], [[-4.0, 4.0]])
    x2 = strategy.aggregate(x1, round_2, round_index=1)
    state_2 = strategy.state_dict()

    # Assert, round 1: Δ = 0.5*[1, 0] + 0.5*[0, 2] = [0.5, 1]; x1 = 0.5*Δ
    assert torch.equal(x1["w"], torch.tensor([0.25, 0.5]))
    # c = 0 + (1/N)*([4, 0] + [0, 8]) = [1, 2]; c_0 = [4, 0], c_2 = [0, 8], client 1 unseen
    assert torch.equal(state_1["c.w"], torch.tensor([1.0, 2.0]))
    assert torch.equal(state_1["c_k.0.w"], torch.tensor([4.0, 0.0]))
    assert torch.equal(state_1["c_k.2.w"], torch.tensor([0.0, 8.0]))
    assert "c_k.1.w" not in state_1
    # round-2 corrections c − c_k: client 0 [1, 2] − [4, 0]; client 1 (c_1 = 0) [1, 2]
    assert torch.equal(correction_of(hook_0), torch.tensor([-3.0, 2.0]))
    assert torch.equal(correction_of(hook_1), torch.tensor([1.0, 2.0]))
    # round 2: x2 = x1 + 0.5*[2, 2]; c = [1, 2] + [-4, 4]/4 = [0, 3]; c_0 = [4, 0] + [-4, 4]
    assert torch.equal(x2["w"], torch.tensor([1.25, 1.5]))
    assert torch.equal(state_2["c.w"], torch.tensor([0.0, 3.0]))
    assert torch.equal(state_2["c_k.0.w"], torch.tensor([0.0, 4.0]))


def test_scaffold_example_weighted_c_under_partial_participation() -> None:
    # Prepare: N = 4 clients, weighting by examples (the default)
    strategy = build("scaffold", num_clients=4)
    x0 = w([0.0, 0.0])

    # Execute, round 1: clients 0 (n=1) and 2 (n=3); round 2: client 0 alone, now n=5
    round_1 = scaffold_updates(
        x0, [[1.0, 0.0], [0.0, 2.0]], [1, 3], [0, 2], [[4.0, 0.0], [0.0, 8.0]]
    )
    x1 = strategy.aggregate(x0, round_1, round_index=0)
    state_1 = strategy.state_dict()
    strategy.aggregate(x1, scaffold_updates(x1, [[2.0, 2.0]], [5], [0], [[-4.0, 4.0]]), 1)
    state_2 = strategy.state_dict()

    # Assert, round 1: w̄ = (1 + 3)/2, so D = 4*2 = 8 (clients 1 and 3 count as holding 2);
    # c = (1*[4, 0] + 3*[0, 8]) / 8
    assert torch.equal(state_1["c.w"], torch.tensor([0.5, 3.0]))
    assert weights_in(state_1) == {0: 1.0, 2: 3.0}
    assert state_1["weight_sum"].item() == 4.0 and state_1["clients_seen"].item() == 2
    # round 2: c_0 = [0, 4], w_0 = 5, D = 4*(5 + 3)/2 = 16; directly, c = (5*[0, 4] +
    # 3*[0, 8]) / 16 = [0, 2.75]; incrementally, [0.5, 3]*8/16 + (5*[-4, 4] + 4*[4, 0])/16
    assert torch.equal(state_2["c_k.0.w"], torch.tensor([0.0, 4.0]))
    assert torch.equal(state_2["c.w"], torch.tensor([0.0, 2.75]))
    assert weights_in(state_2) == {0: 5.0, 2: 3.0}
    assert state_2["weight_sum"].item() == 8.0 and state_2["clients_seen"].item() == 2


def weights_in(state: dict[str, torch.Tensor]) -> dict[int, float]:
    """w_k by client, from the entries of a SCAFFOLD state dict."""
    suffix = f".{WEIGHT_KEY}"
    return {int(k.split(".")[1]): v.item() for k, v in state.items() if k.endswith(suffix)}


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"c.w": torch.zeros(2)}, "weight_sum"),  # c averaged uniformly, by an older fedit
        ({"client_weights": torch.zeros(4, dtype=torch.float64)}, "client_weights"),
        ({"weight_sum": torch.tensor(9.0), "clients_seen": torch.tensor(5)}, "another size"),
        ({"weight_sum": torch.tensor(1.0), "c_k.0.w": torch.zeros(2)}, "no w_k"),
        ({f"c_k.7.{WEIGHT_KEY}": torch.tensor(1.0), "c_k.7.w": torch.zeros(2)}, "outside 0..3"),
    ],
)
def test_scaffold_refuses_a_state_it_cannot_resume(state: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build("scaffold", num_clients=4).load_state_dict(state)


def correction_of(hook: ClientHook) -> torch.Tensor:
    """The correction a hook adds to a zero gradient."""
    param = torch.nn.Parameter(torch.zeros(2))
    hook.start({"w": param})
    param.grad = torch.zeros(2)
    hook.adjust_gradients({"w": param})
    return param.grad


def test_scaffold_rejects_updates_without_control_delta() -> None:
    x = w([0.0, 0.0])
    with pytest.raises(ValueError, match="control_delta"):
        build("scaffold").aggregate(x, updates_for(x, [[1.0, 1.0]]), round_index=0)


def test_scaffold_spills_client_variates_to_the_store(tmp_path: Path) -> None:
    # Prepare: 65 clients (> 64), c_k kept in the engine's store
    strategy = build("scaffold", num_clients=65)
    store = ClientStateStore([])
    strategy.set_client_store(store)
    x = w([0.0, 0.0])

    # Execute: one round, committed as a checkpoint would commit it; then a resumed strategy
    strategy.aggregate(x, scaffold_updates(x, [[1.0, 1.0]], [1], [7], [[65.0, 130.0]]), 0)
    pending = store.pending()
    round_dir = commit_client_state(store, tmp_path / "round_0001")
    store.commit(round_dir)
    resumed = build("scaffold", num_clients=65)
    resumed.set_client_store(ClientStateStore([round_dir]))
    resumed.load_state_dict(strategy.state_dict())

    # Assert: c = [65, 130]/65 = [1, 2]; c_7 = [65, 130] in the store, not in the state dict
    assert sorted(strategy.state_dict()) == ["c.w", "clients_seen", "weight_sum"]
    assert list(pending) == [7] and torch.equal(pending[7]["w"], torch.tensor([65.0, 130.0]))
    assert pending[7][WEIGHT_KEY].item() == 1.0  # w_7 beside c_7, not in the state dict
    # c − c_7 = [1 - 65, 2 - 130]
    assert torch.equal(correction_of(hook_of(resumed, 7, x)), torch.tensor([-64.0, -128.0]))
    # client 7 again, now with 3 examples: the resumed strategy knows its old w_7
    again = scaffold_updates(x, [[1.0, 1.0]], [3], [7], [[0.0, 65.0]])
    strategy.aggregate(x, again, 1)
    resumed.aggregate(x, scaffold_updates(x, [[1.0, 1.0]], [3], [7], [[0.0, 65.0]]), 1)
    assert torch.equal(resumed.state_dict()["c.w"], strategy.state_dict()["c.w"])


def test_scaffold_keeps_few_clients_in_memory() -> None:
    strategy = build("scaffold", num_clients=64)
    store = ClientStateStore([])
    strategy.set_client_store(store)
    x = w([0.0, 0.0])
    strategy.aggregate(x, scaffold_updates(x, [[1.0, 1.0]], [1], [3], [[1.0, 1.0]]), 0)
    assert store.pending() == {}
    assert "c_k.3.w" in strategy.state_dict()


# --- every strategy: resume and purity ----------------------------------------------------


def random_round(x: AdapterState, round_index: int) -> list[ClientUpdate]:
    """Three clients with seeded deltas, sizes 1..3 and control deltas (SCAFFOLD needs them)."""
    gen = torch.Generator().manual_seed(round_index)
    updates = []
    for k in range(3):
        delta = {key: torch.randn(t.shape, generator=gen) for key, t in x.items()}
        control = {key: torch.randn(t.shape, generator=gen) for key, t in x.items()}
        state = {key: t + delta[key] for key, t in x.items()}
        client_id = (round_index + k) % 5
        updates.append(ClientUpdate(client_id, state, k + 1, 2, 0.1, {"control_delta": control}))
    return updates


def start_state() -> AdapterState:
    return {"a": torch.zeros(2, 3), "b": torch.ones(3)}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_save_load_resumes_identically(name: str, tmp_path: Path) -> None:
    # Prepare: 2 rounds, then save the server state to safetensors
    options = {"server_lr": 0.1, "prox_mu": 0.1}
    straight = build(name, 5, **options)
    x = start_state()
    for r in range(2):
        x = straight.aggregate(x, random_round(x, r), r)
    save_file(straight.state_dict(), tmp_path / "server.safetensors")

    # Execute: a fresh object loads the state and runs round 3 next to the uninterrupted one
    resumed = build(name, 5, **options)
    resumed.load_state_dict(load_file(tmp_path / "server.safetensors"))
    expected = straight.aggregate(x, random_round(x, 2), 2)
    got = resumed.aggregate(x, random_round(x, 2), 2)

    # Assert
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert straight.state_dict().keys() == resumed.state_dict().keys()
    assert all(torch.equal(t, resumed.state_dict()[k]) for k, t in straight.state_dict().items())


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_aggregate_does_not_modify_inputs(name: str) -> None:
    strategy = build(name, 5)
    x = start_state()
    for r in range(2):  # the second round exercises the server state too
        updates = random_round(x, r)
        x_copy = {k: t.clone() for k, t in x.items()}
        y_copies = [{k: t.clone() for k, t in u.state.items()} for u in updates]
        new_x = strategy.aggregate(x, updates, r)
        assert all(torch.equal(x[k], x_copy[k]) for k in x)
        for update, y_copy in zip(updates, y_copies, strict=True):
            assert all(torch.equal(update.state[k], y_copy[k]) for k in y_copy)
        x = new_x


def test_stateless_strategy_refuses_foreign_state() -> None:
    with pytest.raises(ValueError, match="keeps no server state"):
        build("fedavg").load_state_dict({"v.w": torch.zeros(1)})


# --- SCAFFOLD's fixed point follows the weighting ----------------------------------------


def scaffold_on_quadratics(weighting: str, rounds: int = 60) -> float:
    """Two clients f_k(x) = ½(x − a_k)², a = (0, 10), n = (1, 9), both in every round: 5
    local steps of plain SGD (η_l = 0.1) through ScaffoldHook, then Scaffold.aggregate."""
    targets, sizes, lr, steps = (0.0, 10.0), (1, 9), 0.1, 5
    strategy = build("scaffold", num_clients=2, weighting=weighting)
    x = w([0.0])
    for r in range(rounds):
        updates = []
        for k, (target, n) in enumerate(zip(targets, sizes, strict=True)):
            hook = hook_of(strategy, k, x)
            theta = torch.nn.Parameter(x["w"].clone())
            hook.start({"w": theta})
            for _ in range(steps):
                theta.grad = theta.detach() - target  # ∇f_k
                hook.adjust_gradients({"w": theta})
                with torch.no_grad():
                    theta -= lr * theta.grad
            extras = hook.finish({"w": theta}, steps, lr)
            updates.append(ClientUpdate(k, {"w": theta.detach().clone()}, n, steps, lr, extras))
        x = strategy.aggregate(x, updates, r)
    return x["w"].item()


def test_scaffold_converges_to_the_optimum_of_its_weighting() -> None:
    # Σ_k p_k ∇f_k(x) = 0: x = 0.1*0 + 0.9*10 = 9 by examples, (0 + 10)/2 = 5 uniform
    assert scaffold_on_quadratics("examples") == pytest.approx(9.0, abs=1e-4)
    assert scaffold_on_quadratics("uniform") == pytest.approx(5.0, abs=1e-4)


def commit_client_state(store: ClientStateStore, directory: Path) -> Path:
    """What save_checkpoint does with the store's pending state: one file per client."""
    (directory / "client_state").mkdir(parents=True)
    for client_id, state in store.pending().items():
        save_file(state, directory / "client_state" / f"{client_id}.safetensors")
    return directory


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_reset_makes_the_strategy_as_new(name: str, tmp_path: Path) -> None:
    # Prepare: two rounds of server state (SCAFFOLD's c_k spilled to disk: 65 clients)
    options = {"server_lr": 0.1, "prox_mu": 0.1}
    used, fresh = build(name, 65, **options), build(name, 65, **options)
    used_store = ClientStateStore([])
    used.set_client_store(used_store)
    fresh.set_client_store(ClientStateStore([]))
    x = start_state()
    for r in range(2):
        x = used.aggregate(x, random_round(x, r), r)
        used_store.commit(commit_client_state(used_store, tmp_path / f"round_{r + 1}"))

    # Execute
    used.reset()

    # Assert: the same state and the same next step as a strategy that never ran
    assert used.state_dict().keys() == fresh.state_dict().keys()
    assert all(torch.equal(t, fresh.state_dict()[k]) for k, t in used.state_dict().items())
    assert all(used_store.get(k) is None for k in range(65))
    expected = fresh.aggregate(x, random_round(x, 2), 2)
    got = used.aggregate(x, random_round(x, 2), 2)
    assert all(torch.equal(expected[key], got[key]) for key in expected)
