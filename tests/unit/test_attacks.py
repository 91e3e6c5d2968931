"""The attack harness's pure parts: [attack] refusals naming the field, the malicious set,
and the model attacks on hand-computed tensors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fedit.attacks import ceil_share, malicious_clients
from fedit.attacks.model import ModelAttack, attack_update, client_attack
from fedit.config import AttackConfig, ConfigError, load_config
from fedit.privacy.mechanism import gaussian_noise
from fedit.seeding import Stream, derive_seed
from fedit.types import ClientUpdate


def attack_config(*overrides: str, clients: int = 10):
    base = ["data.path=synthetic", f"partition.num_clients={clients}"]
    return load_config(None, [*base, *overrides])


# --- config --------------------------------------------------------------------------------


def test_attack_is_off_by_default() -> None:
    cfg = attack_config()
    assert cfg.attack == AttackConfig()
    assert cfg.attack.kind == "none"
    assert malicious_clients(cfg, 10) == []


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        (["attack.kind=flip"], "attack.kind", "must be one of none, sign_flip"),
        (["attack.clients=[1]"], "attack.kind", "no attack kind"),
        (["attack.fraction=0.2"], "attack.kind", "no attack kind"),
        (
            ["attack.kind=scale", "attack.clients=[1]", "attack.fraction=0.2"],
            "attack.clients",
            "not both",
        ),
        (["attack.kind=scale", "attack.clients=[1, 1]"], "attack.clients", "more than once"),
        (["attack.kind=scale", "attack.clients=[-1]"], "attack.clients", ">= 0"),
        (["attack.kind=scale", "attack.clients=[10]"], "attack.clients", "< partition.num"),
        (["attack.kind=scale", 'attack.clients=["a"]'], "attack.clients", "list of integers"),
        (["attack.kind=scale", "attack.fraction=1.0"], "attack.fraction", r"\[0, 1\)"),
        (["attack.kind=scale", "attack.fraction=-0.1"], "attack.fraction", r"\[0, 1\)"),
        (["attack.kind=scale", "attack.scale=0"], "attack.scale", "positive"),
        (["attack.kind=sign_flip", "attack.flip_scale=-1"], "attack.flip_scale", "positive"),
        (["attack.kind=gaussian", "attack.noise_std=0"], "attack.noise_std", "positive"),
        (
            ["attack.kind=backdoor", "attack.poison_fraction=0"],
            "attack.poison_fraction",
            r"\(0, 1\]",
        ),
        (
            ["attack.kind=backdoor", "attack.poison_fraction=1.5"],
            "attack.poison_fraction",
            r"\(0, 1\]",
        ),
        (["attack.kind=backdoor", 'attack.target=" "'], "attack.target", "empty"),
        (["attack.kind=backdoor", 'attack.trigger=""'], "attack.trigger", "empty"),
        # an attack cannot be honest outside a federation (fedit compare resets it there)
        (["attack.kind=scale", "federation.mode=centralized"], "attack.kind", "'federated'"),
        (["attack.kind=sign_flip", "federation.mode=local"], "attack.kind", "'federated'"),
        (
            ["attack.kind=backdoor", "train.objective=dpo", "data.preference_path=synthetic"],
            "attack.kind",
            "does not train on",
        ),
    ],
)
def test_bad_attack_config_names_the_field(overrides, field: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"{field}: .*{message}"):
        attack_config(*overrides)


def test_a_kind_without_malicious_clients_is_the_clean_reference() -> None:
    cfg = attack_config("attack.kind=backdoor")
    assert malicious_clients(cfg, 10) == []


def test_ids_beyond_the_clients_of_a_files_partition_are_refused_once_n_is_known() -> None:
    cfg = attack_config("partition.method=files", "attack.kind=scale", "attack.clients=[2, 5]")
    assert malicious_clients(cfg, 6) == [2, 5]
    with pytest.raises(ConfigError, match=r"attack.clients: \[5\] not among the run's 4"):
        malicious_clients(cfg, 4)


# --- the malicious set ---------------------------------------------------------------------


def test_listed_clients_are_the_malicious_set_sorted() -> None:
    cfg = attack_config("attack.kind=scale", "attack.clients=[7, 0, 3]")
    assert malicious_clients(cfg, 10) == [0, 3, 7]


@pytest.mark.parametrize(
    ("fraction", "n", "count"),
    [(0.2, 10, 2), (0.3, 10, 3), (0.25, 10, 3), (0.01, 10, 1), (0.0, 10, 0), (0.5, 3, 2)],
)
def test_ceil_share(fraction: float, n: int, count: int) -> None:
    assert ceil_share(fraction, n) == count


def test_a_fraction_draws_a_seeded_sorted_set() -> None:
    cfg = attack_config("attack.kind=sign_flip", "attack.fraction=0.3")
    chosen = malicious_clients(cfg, 10)
    assert len(chosen) == 3 and chosen == sorted(chosen)
    assert malicious_clients(cfg, 10) == chosen  # deterministic
    # the first ceil(f·N) of the permutation seeded by (run seed, Stream.ATTACK)
    order = np.random.default_rng(derive_seed(42, Stream.ATTACK)).permutation(10)
    assert chosen == sorted(order[:3].tolist())
    other_seeds = {tuple(malicious_clients(replace(cfg, seed=s), 10)) for s in range(8)}
    assert len(other_seeds) > 1  # the run seed chooses
    half = replace(cfg, attack=replace(cfg.attack, fraction=0.5))
    assert set(malicious_clients(half, 10)) > set(chosen)  # a prefix of the same permutation


def test_only_malicious_clients_get_a_model_attack() -> None:
    cfg = attack_config("attack.kind=scale", "attack.clients=[2]")
    assert client_attack(cfg, 2, 10) == ModelAttack(cfg.attack, cfg.seed)
    assert client_attack(cfg, 1, 10) is None
    data_attack = attack_config("attack.kind=poison_responses", "attack.clients=[2]")
    assert client_attack(data_attack, 2, 10) is None  # acts on its records instead


# --- model attacks on hand-computed tensors -----------------------------------------------

X = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5], [-1.0]])}
Y = {"a": torch.tensor([1.5, 1.0]), "b": torch.tensor([[0.5], [0.0]])}  # Δ = [.5, -1], [0, 1]


def update_of(state) -> ClientUpdate:
    return ClientUpdate(
        3, state, num_examples=7, num_steps=2, learning_rate=0.1, metrics={"train_loss": 1.0}
    )


@pytest.mark.parametrize(
    ("kind", "settings", "a", "b"),
    [
        ("sign_flip", {}, [0.5, 3.0], [[0.5], [-2.0]]),  # x − Δ
        ("sign_flip", {"flip_scale": 2.0}, [0.0, 4.0], [[0.5], [-3.0]]),  # x − 2Δ
        ("scale", {"scale": 10.0}, [6.0, -8.0], [[0.5], [9.0]]),  # x + 10Δ
    ],
)
def test_scaling_attacks(kind: str, settings: dict, a: list, b: list) -> None:
    attacked = attack_update(update_of(Y), X, AttackConfig(kind=kind, **settings), seed=0)
    assert torch.equal(attacked.state["a"], torch.tensor(a))
    assert torch.equal(attacked.state["b"], torch.tensor(b))
    assert (attacked.client_id, attacked.num_examples, attacked.num_steps) == (3, 7, 2)
    assert attacked.metrics == {"train_loss": 1.0}
    assert torch.equal(Y["a"], torch.tensor([1.5, 1.0]))  # the honest update is not changed


def test_gaussian_attack_discards_the_delta_and_draws_seeded_noise() -> None:
    attack = AttackConfig(kind="gaussian", noise_std=0.5)
    sent = attack_update(update_of(Y), X, attack, seed=11)
    noise = gaussian_noise(X, 0.5, 11)
    for key in X:
        assert torch.equal(sent.state[key], X[key] + noise[key])
    other_y = attack_update(update_of({k: t * 3 for k, t in Y.items()}), X, attack, seed=11)
    assert all(torch.equal(other_y.state[k], sent.state[k]) for k in X)  # Δ discarded
    assert not torch.equal(
        attack_update(update_of(Y), X, attack, seed=12).state["a"], sent.state["a"]
    )
    big = {"w": torch.zeros(20000)}
    drawn = attack_update(update_of(big), big, attack, seed=1).state["w"]
    assert drawn.std().item() == pytest.approx(0.5, rel=0.03)
    assert drawn.mean().item() == pytest.approx(0.0, abs=0.02)


def test_attacked_state_keeps_the_global_dtype() -> None:
    x = {"a": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    y = {"a": torch.tensor([1.5, 1.0], dtype=torch.bfloat16)}
    sent = attack_update(update_of(y), x, AttackConfig(kind="sign_flip"), seed=0)
    assert sent.state["a"].dtype == torch.bfloat16
    assert sent.state["a"].tolist() == [0.5, 3.0]


def test_the_gaussian_seed_is_per_round_and_client() -> None:
    plan = ModelAttack(AttackConfig(kind="gaussian"), run_seed=5)
    assert plan.seed(1, 2) == derive_seed(5, Stream.ATTACK, 1, 2)
    assert len({plan.seed(r, k) for r in range(3) for k in range(3)}) == 9
