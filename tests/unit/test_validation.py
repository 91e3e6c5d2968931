"""Server-side validation of client updates: every malformed kind rejected with a reason,
and the aggregate bit for bit what the valid updates alone give."""

import copy
import random

import pytest
import torch

from fedit.config import StrategyConfig
from fedit.server.strategies import build_strategy
from fedit.server.validation import (
    AllUpdatesRejectedError,
    RoundExpectations,
    validate_updates,
)
from fedit.types import ClientUpdate, Rejection

X = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
STEPS = 3
LR = 0.1


def expectations(**changes) -> RoundExpectations:
    values = dict(
        global_state=X,
        clients=frozenset(range(300)),
        learning_rate=LR,
        steps_for=lambda examples: STEPS,
        max_examples=1000,
        max_update_norm=50.0,
        extras=frozenset({"control_delta"}),
    )
    return RoundExpectations(**(values | changes))


def honest(client_id: int, scale: float = 1.0) -> ClientUpdate:
    generator = torch.Generator().manual_seed(client_id)
    state = {k: scale * torch.randn(t.shape, generator=generator) for k, t in X.items()}
    control = {k: torch.randn(t.shape, generator=generator) for k, t in X.items()}
    return ClientUpdate(
        client_id,
        state,
        num_examples=10 + client_id,
        num_steps=STEPS,
        learning_rate=LR,
        extras={"control_delta": control},
        metrics={"train_loss": 0.5, "label_tokens": 40},
    )


def _set(update, **fields):
    for name, value in fields.items():
        setattr(update, name, value)


def _state(update, key=None, value=None, drop=None):
    if drop is not None:
        del update.state[drop]
    if key is not None:
        update.state[key] = value


def _poison(part: str, value: float):
    def corrupt(update, rng):
        tensors = update.state if part == "state" else update.extras["control_delta"]
        key = rng.choice(sorted(tensors))
        flat = tensors[key].view(-1)
        flat[rng.randrange(flat.numel())] = value

    return corrupt


# kind → (how to corrupt a copy of an honest update, the start of the reason expected)
KINDS = {
    "unsampled client": (lambda u, rng: _set(u, client_id=300 + rng.randrange(50)), "client "),
    "negative client id": (lambda u, rng: _set(u, client_id=-1 - rng.randrange(5)), "client -"),
    "client id not an int": (lambda u, rng: _set(u, client_id=str(u.client_id)), "client '"),
    "zero examples": (lambda u, rng: _set(u, num_examples=0), "num_examples 0 "),
    "negative examples": (lambda u, rng: _set(u, num_examples=-rng.randrange(1, 99)), "num_ex"),
    "absurd examples": (lambda u, rng: _set(u, num_examples=10 ** rng.randrange(4, 18)), "num_ex"),
    "float examples": (lambda u, rng: _set(u, num_examples=12.0), "num_examples 12.0"),
    "bool examples": (lambda u, rng: _set(u, num_examples=True), "num_examples True"),
    "missing examples": (lambda u, rng: _set(u, num_examples=None), "num_examples None"),
    "wrong steps": (lambda u, rng: _set(u, num_steps=rng.choice([0, 2, 4, 99])), "num_steps"),
    "float steps": (lambda u, rng: _set(u, num_steps=3.0), "num_steps 3.0"),
    "wrong learning rate": (lambda u, rng: _set(u, learning_rate=LR * 10), "learning_rate"),
    "nan metric": (lambda u, rng: u.metrics.update(train_loss=float("nan")), "metric train_"),
    "inf metric": (lambda u, rng: u.metrics.update(seconds=float("-inf")), "metric seconds"),
    "list metric": (lambda u, rng: u.metrics.update(steps=[1, 2]), "metric steps is not"),
    "bool metric": (lambda u, rng: u.metrics.update(ok=True), "metric ok is not a number"),
    "metrics not a dict": (lambda u, rng: _set(u, metrics=[0.5]), "metrics is a list"),
    "missing key": (lambda u, rng: _state(u, drop=rng.choice("ab")), "state keys differ"),
    "extra key": (lambda u, rng: _state(u, "c", torch.zeros(1)), "state keys differ"),
    "wrong shape": (lambda u, rng: _state(u, "a", torch.zeros(3, 2)), "state a has shape"),
    "flattened": (lambda u, rng: _state(u, "a", torch.zeros(6)), "state a has shape"),
    "float64": (lambda u, rng: _state(u, "b", torch.zeros(4, dtype=torch.float64)), "state b"),
    "float16": (lambda u, rng: _state(u, "b", torch.zeros(4, dtype=torch.float16)), "state b"),
    "int tensor": (lambda u, rng: _state(u, "b", torch.zeros(4, dtype=torch.int64)), "state b"),
    "not a tensor": (lambda u, rng: _state(u, "b", [0.0] * 4), "state b is a list"),
    "state not a dict": (lambda u, rng: _set(u, state=[1.0]), "state is a list"),
    "missing extras": (lambda u, rng: _set(u, extras={}), "extras [], expected"),
    "extra extras": (lambda u, rng: u.extras.update(other=X), "extras [control_delta, other]"),
    "extras shape": (
        lambda u, rng: u.extras["control_delta"].update(b=torch.zeros(5)),
        "extras.control_delta b has shape",
    ),
    "nan in state": (_poison("state", float("nan")), "non-finite values in state"),
    "inf in state": (_poison("state", float("inf")), "non-finite values in state"),
    "-inf in state": (_poison("state", float("-inf")), "non-finite values in state"),
    "nan in extras": (_poison("extras", float("nan")), "non-finite values in extras"),
    "norm beyond bound": (
        lambda u, rng: _set(u, state={k: t * rng.uniform(60, 1e6) for k, t in u.state.items()}),
        "update norm",
    ),
}


def malformed(count: int, seed: int = 0) -> list[tuple[str, ClientUpdate, str]]:
    """`count` malformed updates cycling through every kind, from honest updates of clients
    100.. (sampled, so the kind itself is what gets them rejected)."""
    rng = random.Random(seed)
    made = []
    for index in range(count):
        kind = list(KINDS)[index % len(KINDS)]
        corrupt, reason = KINDS[kind]
        update = copy.deepcopy(honest(100 + index, scale=0.1))
        corrupt(update, rng)
        made.append((kind, update, reason))
    return made


def test_every_kind_of_malformed_update_is_rejected_with_its_reason() -> None:
    bad = malformed(170)  # every kind five times over
    kept, rejected = validate_updates([u for _, u, _ in bad], expectations())
    assert kept == []
    assert len(rejected) == len(bad)
    for (kind, update, reason), rejection in zip(bad, rejected, strict=True):
        assert rejection.client_id == update.client_id, kind
        assert rejection.reason.startswith(reason), (kind, rejection.reason)


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "scaffold"])
def test_malformed_updates_leave_the_aggregate_bit_identical(name: str) -> None:
    clean = [honest(k) for k in range(5)]
    bad = [u for _, u, _ in malformed(120, seed=1)]
    mixed = bad[:60] + clean[:2] + bad[60:] + clean[2:]
    kept, rejected = validate_updates(mixed, expectations())
    assert [u.client_id for u in kept] == list(range(5)) and len(rejected) == 120
    assert all(a is b for a, b in zip(kept, clean, strict=True))  # passed through untouched

    def aggregate(updates):
        strategy = build_strategy(StrategyConfig(name=name), num_clients=300)
        return strategy.aggregate(X, updates, 0), strategy.checkpoint_state()

    (with_bad, state_bad), (without, state) = aggregate(kept), aggregate(clean)
    assert all(torch.equal(with_bad[k], without[k]) for k in X)
    assert state_bad.keys() == state.keys()
    assert all(torch.equal(state_bad[k], state[k]) for k in state)


def test_two_updates_claiming_one_client_are_both_rejected() -> None:
    kept, rejected = validate_updates([honest(3), honest(3), honest(4)], expectations())
    assert [u.client_id for u in kept] == [4]
    assert rejected == [Rejection(3, "2 updates claim this client")] * 2


def test_the_bounds_come_from_the_config_not_the_update() -> None:
    big = honest(2, scale=10.0)
    norm = float(torch.cat([t.view(-1) for t in big.state.values()]).norm())
    assert 20 < norm < 50
    assert validate_updates([big], expectations())[1] == []
    rejected = validate_updates([big], expectations(max_update_norm=20.0))[1]
    assert rejected[0].reason == f"update norm {norm:.4g} exceeds validation.max_update_norm 20"
    assert validate_updates([big], expectations(max_update_norm=None))[1] == []
    many = honest(2)
    many.num_examples = 1001
    assert "[1, 1000]" in validate_updates([many], expectations())[1][0].reason
    steps = honest(2)
    reason = validate_updates([steps], expectations(steps_for=lambda n: n // 2))[1][0].reason
    assert reason == "num_steps 3, expected 6"  # 12 records


def test_the_all_rejected_error_names_the_round_and_clients() -> None:
    err = AllUpdatesRejectedError(4, [Rejection(1, "x"), Rejection(3, "y")])
    with pytest.raises(ValueError, match=r"round 4: every client was rejected \(client 1: x; "):
        raise err
    assert Rejection(1, "x").as_record() == {"client": 1, "reason": "x"}
