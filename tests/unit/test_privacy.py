"""Client-level DP (fedit.privacy): clipping and noise maths, the central aggregator, the
accountant against dp-accounting called directly, the target-ε search, the config refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from fedit import plugins
from fedit.client.session import LocalClient
from fedit.config import ConfigError, DPOConfig, RunConfig, load_config
from fedit.engine.run_dir import resume_conflicts
from fedit.experiments.compare import Contender
from fedit.fleet.selection import select_clients
from fedit.ops.aggregation import clip_to_norm
from fedit.privacy import accountant
from fedit.privacy.mechanism import (
    dp_mean,
    gaussian_noise,
    local_release,
    noise_seed,
    released_update,
)
from fedit.privacy.plan import (
    PrivacyPlan,
    client_plan,
    local_releases,
    resolve_plan,
    selection_seed,
)
from fedit.seeding import Stream, derive_seed
from fedit.server.aggregators import AGGREGATORS, MeanAggregator, build_aggregator
from fedit.server.aggregators.dp_fedavg import DPFedAvgAggregator
from fedit.types import ClientUpdate

DP = {"privacy.mode": "central", "privacy.noise_multiplier": 1.0, "strategy.weighting": "uniform"}


def dp_config(**values: object) -> RunConfig:
    merged = {"data.path": "x.jsonl", **DP, **values}
    return load_config(None, [f"{k}={_toml(v)}" for k, v in merged.items()])


def _toml(value: object) -> str:
    if value is None:  # an empty override unsets an optional key
        return ""
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def plan(mode: str = "central", **values: object) -> PrivacyPlan:
    fields = {
        "mode": mode,
        "clip_norm": 1.0,
        "noise_multiplier": 1.0,
        "delta": 1e-3,
        "sampled": 2,
        "population": 10,
        "releases": (0, 1, 2, 3),
        "run_seed": 7,
        "reproducible_noise": True,
        **values,
    }
    return PrivacyPlan(**fields)


# --- clipping and noise ------------------------------------------------------------------


def test_clip_scales_by_c_over_the_global_norm_of_all_tensors() -> None:
    # ‖Δ‖ = sqrt(3² + 4²) = 5 over both tensors; C = 1: factor 1/5
    delta = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[0.0], [4.0]])}
    clipped, norm = clip_to_norm(delta, 1.0)
    assert norm == pytest.approx(5.0)
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0]))
    assert torch.allclose(clipped["b"], torch.tensor([[0.0], [0.8]]))
    assert torch.equal(delta["a"], torch.tensor([3.0, 0.0]))  # the input is untouched
    unclipped, _ = clip_to_norm(delta, 10.0)  # within the bound: unchanged
    assert all(torch.equal(unclipped[k], delta[k]) for k in delta)


def test_clip_leaves_a_zero_delta_zero() -> None:
    zero = {"a": torch.zeros(3)}
    clipped, norm = clip_to_norm(zero, 1.0)
    assert norm == 0.0 and torch.equal(clipped["a"], zero["a"])


def test_dp_mean_divides_the_noised_sum_by_the_planned_count() -> None:
    clipped = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])}]
    noise = {"w": torch.tensor([0.5, -1.0])}
    # m = 4 sampled, 2 replied: ((1 + 3 + 0.5) / 4, (2 + 4 - 1) / 4)
    assert torch.allclose(dp_mean(clipped, noise, 4)["w"], torch.tensor([1.125, 1.25]))
    with pytest.raises(ValueError, match="denominator"):
        dp_mean(clipped, noise, 1)


def test_gaussian_noise_is_fixed_by_its_seed_and_has_the_std() -> None:
    like = {"a": torch.zeros(100, 100), "b": torch.zeros(50)}
    first, again = gaussian_noise(like, 0.3, 11), gaussian_noise(like, 0.3, 11)
    assert all(torch.equal(first[k], again[k]) for k in like)
    assert not torch.equal(first["a"], gaussian_noise(like, 0.3, 12)["a"])
    assert first["a"].dtype == torch.float32 and first["b"].shape == (50,)
    assert float(first["a"].std()) == pytest.approx(0.3, rel=0.03)
    assert abs(float(first["a"].mean())) < 0.01


def test_noise_seed_is_secret_unless_reproducible() -> None:
    assert noise_seed(5, True, Stream.CENTRAL_NOISE, 2) == derive_seed(5, Stream.CENTRAL_NOISE, 2)
    assert noise_seed(5, False, Stream.CENTRAL_NOISE, 2) != noise_seed(
        5, False, Stream.CENTRAL_NOISE, 2
    )


def test_a_local_release_is_x_plus_clipped_delta_plus_the_seeded_noise() -> None:
    x = {"w": torch.tensor([1.0, 1.0])}
    y = {"w": torch.tensor([4.0, 5.0])}  # Δ = (3, 4), ‖Δ‖ = 5; C = 2: (1.2, 1.6)
    update = ClientUpdate(3, y, 10, 2, 0.1, metrics={"train_loss": 1.0})
    sent = released_update(update, x, local_release(update, x, 2.0, 0.5, seed=9))
    noise = gaussian_noise(x, 0.5, 9)["w"]
    assert torch.allclose(sent.state["w"], torch.tensor([2.2, 2.6]) + noise)
    assert torch.equal(update.state["w"], torch.tensor([4.0, 5.0]))  # the input is untouched
    assert (sent.client_id, sent.num_examples, sent.metrics) == (3, 10, {"train_loss": 1.0})


# --- the central aggregator ----------------------------------------------------------------


def test_dp_fedavg_aggregate_is_the_clipped_mean_plus_noise_of_std_sigma_c_over_m() -> None:
    sigma, c, m = 0.8, 0.5, 4
    aggregator = DPFedAvgAggregator(plan(noise_multiplier=sigma, clip_norm=c, sampled=m))
    x = {"w": torch.zeros(50)}
    # client 0 within the bound, client 1 clipped from norm 10 to 0.5; 2 of m = 4 replied
    updates = [
        ClientUpdate(0, {"w": torch.full((50,), 0.01)}, 5, 1, 0.1),
        ClientUpdate(1, {"w": torch.full((50,), 10 / math.sqrt(50))}, 5, 1, 0.1),
    ]
    clean = (0.01 + 0.5 / math.sqrt(50)) / m
    noise = torch.cat(
        [aggregator.delta(x, updates, [0.5, 0.5], r)["w"] - clean for r in range(400)]
    )
    assert float(noise.std()) == pytest.approx(sigma * c / m, rel=0.03)
    assert abs(float(noise.mean())) < 0.01 * sigma * c / m * 10
    assert aggregator.metrics()["clipped"] == [1]
    assert aggregator.metrics()["update_norms"] == pytest.approx([0.01 * math.sqrt(50), 10.0])
    assert aggregator.metrics()["denominator"] == m


def test_dp_fedavg_noise_is_the_rounds_seeded_draw_with_reproducible_noise() -> None:
    aggregator = DPFedAvgAggregator(plan(noise_multiplier=2.0, clip_norm=1.0, sampled=1))
    x = {"w": torch.zeros(3)}
    got = aggregator.delta(x, [ClientUpdate(0, {"w": torch.zeros(3)}, 1, 1, 0.1)], [1.0], 5)
    expected = gaussian_noise(x, 2.0, derive_seed(7, Stream.CENTRAL_NOISE, 5))
    assert torch.equal(got["w"], expected["w"])


def test_central_privacy_builds_the_dp_aggregator(tmp_path: Path) -> None:
    aggregator = build_aggregator(dp_config(), 10)
    assert isinstance(aggregator, DPFedAvgAggregator) and aggregator.plan.sampled == 10
    local = dp_config(**{"privacy.mode": "local"})
    assert type(build_aggregator(local, 10)) is MeanAggregator


# --- the accountant ------------------------------------------------------------------------


def direct_epsilon(sigma: float, rounds: int, delta: float, m: int, n: int) -> float:
    """dp-accounting called directly: replace-one, Gaussian of std σC over sensitivity 2C."""
    event: dp_event.DpEvent = dp_event.GaussianDpEvent(sigma / 2)
    if m < n:
        event = dp_event.SampledWithoutReplacementDpEvent(n, m, event)
    rdp = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    return rdp.compose(dp_event.SelfComposedDpEvent(event, rounds)).get_epsilon(delta)


@pytest.mark.parametrize(
    ("sigma", "rounds", "delta", "m", "n"),
    [
        (1.0, 10, 1e-2, 2, 10),
        (2.5, 50, 1e-4, 10, 100),
        (1.0, 3, 0.04, 5, 5),  # everyone, every round: no amplification
    ],
)
def test_epsilon_matches_dp_accounting(sigma, rounds, delta, m, n) -> None:
    expected = direct_epsilon(sigma, rounds, delta, m, n)
    assert accountant.epsilon(sigma, rounds, delta, m, n, "rdp") == pytest.approx(
        expected, rel=1e-12
    )


def test_epsilon_of_one_unsampled_round_is_the_gaussian_rdp_bound() -> None:
    # RDP of Gaussian(σ/2): α·2/σ²; dp-accounting's conversion is never worse than the
    # classic ε = min_α α·2/σ² + log(1/δ)/(α − 1)
    sigma, delta = 4.0, 1e-5
    classic = min(
        a * 2 / sigma**2 + math.log(1 / delta) / (a - 1) for a in accountant.new_accountant().orders
    )
    assert accountant.epsilon(sigma, 1, delta, 1, 1, "rdp") <= classic
    assert accountant.epsilon(sigma, 0, delta, 1, 1, "rdp") == 0.0
    assert accountant.epsilon(sigma, 0, delta, 1, 1, "pld") == 0.0


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_sampling() -> None:
    by_rounds = [accountant.epsilon(1.0, r, 1e-3, 2, 10) for r in (1, 2, 5, 20)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
    by_sigma = [accountant.epsilon(s, 10, 1e-3, 2, 10) for s in (0.8, 1.0, 2.0, 4.0)]
    assert by_sigma == sorted(by_sigma, reverse=True) and len(set(by_sigma)) == 4
    assert accountant.epsilon(1.0, 10, 1e-3, 2, 10) < accountant.epsilon(1.0, 10, 1e-3, 10, 10)


@pytest.mark.parametrize(("target", "rounds", "m", "n"), [(3.0, 20, 1, 1), (8.0, 3, 2, 5)])
def test_the_rdp_search_gives_the_smallest_sigma_that_meets_it(target, rounds, m, n):
    delta = 1e-3
    sigma = accountant.noise_for_target(target, rounds, delta, m, n, "rdp")
    assert direct_epsilon(sigma, rounds, delta, m, n) <= target
    smaller = sigma - 2 * accountant.SIGMA_TOLERANCE
    assert direct_epsilon(smaller, rounds, delta, m, n) > target


def test_a_target_any_noise_meets_is_refused() -> None:
    with pytest.raises(ValueError, match="no meaningful noise"):
        accountant.noise_for_target(1e9, 1, 1e-3, 1, 1)


# --- the plan -----------------------------------------------------------------------------


def test_plan_defaults_delta_to_one_over_n_squared_and_reports_epsilon() -> None:
    cfg = dp_config(**{"federation.rounds": 4, "federation.clients_per_round": 3})
    resolved = resolve_plan(cfg, 10)
    assert resolved is not None
    assert (resolved.delta, resolved.sampled, resolved.population) == (0.01, 3, 10)
    assert resolved.releases == (0, 1, 2, 3, 4)
    assert resolved.record(2) == {
        "mode": "central",
        "epsilon": accountant.epsilon(1.0, 2, 0.01, 3, 10, "pld"),
        "releases": 2,
        "accountant": "pld",
        "delta": 0.01,
        "noise_multiplier": 1.0,
        "clip_norm": 1.0,
    }
    assert resolve_plan(dp_config(**{"privacy.mode": "off"}), 10) is None
    assert client_plan(cfg, 10) is None  # the central noise is the server's


def test_plan_searches_sigma_for_the_target() -> None:
    cfg = dp_config(
        **{"privacy.mode": "local", "privacy.noise_multiplier": None, "privacy.target_epsilon": 4.0}
    )
    resolved = resolve_plan(cfg, 10)
    assert resolved is not None and resolved.target_epsilon == 4.0
    assert resolved.epsilon(cfg.federation.rounds) <= 4.0
    assert resolved.noise_multiplier == accountant.noise_for_target(4.0, 10, 0.01, 1, 1)


def test_local_releases_count_the_most_rounds_one_client_was_selected_for() -> None:
    cfg = dp_config(
        **{"privacy.mode": "local", "federation.rounds": 6, "federation.clients_per_round": 2}
    )
    counts = [0] * 5
    expected = [0]
    for r in range(6):
        for k in select_clients(5, 2, None, cfg.seed, r):
            counts[k] += 1
        expected.append(max(counts))
    assert local_releases(5, cfg) == tuple(expected)
    resolved = resolve_plan(cfg, 5)
    assert resolved is not None
    assert resolved.epsilon(expected[-1]) == accountant.epsilon(1.0, expected[-1], 0.04, 1, 1)
    # the ε a run reports composes the releases made: the most rounds one client was asked
    assert resolved.releases_made(6, {0: 2, 3: 4}) == 4
    assert resolve_plan(dp_config(), 5).releases_made(6, {0: 2}) == 6  # central: every round


def test_central_selection_is_secret_unless_noise_is_reproducible() -> None:
    central = dp_config()
    assert selection_seed(central) != selection_seed(central)
    assert selection_seed(dp_config(**{"privacy.reproducible_noise": True})) == central.seed
    assert selection_seed(dp_config(**{"privacy.mode": "local"})) == central.seed
    assert selection_seed(dp_config(**{"privacy.mode": "off"})) == central.seed


def test_a_client_refuses_a_central_plan() -> None:
    with pytest.raises(ValueError, match="local mode only"):
        LocalClient(
            0,
            [],
            [],
            0,
            DPOConfig(),
            privacy=plan("central"),
            attack=None,
            compressor=None,
            own=None,
        )


# --- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "field", "words"),
    [
        ({"privacy.mode": "secret"}, "privacy.mode", "must be one of"),
        ({"privacy.accountant": "moments"}, "privacy.accountant", "must be one of pld, rdp"),
        ({"privacy.clip_norm": 0}, "privacy.clip_norm", "positive"),
        ({"privacy.noise_multiplier": -1}, "privacy.noise_multiplier", "positive"),
        ({"privacy.delta": 1.0}, "privacy.delta", r"\(0, 1\)"),
        ({"privacy.noise_multiplier": None}, "privacy.noise_multiplier", "exactly one"),
        ({"privacy.target_epsilon": 3.0}, "privacy.noise_multiplier", "exactly one"),
        ({"strategy.weighting": "examples"}, "strategy.weighting", "record counts"),
        (
            {"privacy.mode": "local", "strategy.weighting": "examples"},
            "strategy.weighting",
            "uniform",
        ),
        ({"strategy.name": "scaffold"}, "strategy.name", "control variates"),
        ({"privacy.mode": "local", "strategy.name": "scaffold"}, "strategy.name", "control"),
        ({"strategy.lora_aggregation": "exact"}, "strategy.lora_aggregation", "un-noised"),
        ({"federation.mode": "centralized"}, "privacy.mode", "federated"),
        ({"federation.mode": "local"}, "privacy.mode", "federated"),
        ({"partition.num_clients": 1}, "privacy.delta", "one client"),
        (
            {"privacy.mode": "off", "strategy.aggregator": "dp_fedavg"},
            "strategy.aggregator",
            "central",
        ),
    ],
)
def test_config_refusals_name_the_field(values, field, words) -> None:
    with pytest.raises(ConfigError, match=rf"{field}: .*{words}"):
        dp_config(**values)


def test_central_dp_refuses_another_aggregator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(AGGREGATORS, "other", lambda cfg, n: MeanAggregator())
    monkeypatch.setitem(plugins.AGGREGATORS, "other", plugins.AggregatorTraits())
    with pytest.raises(ConfigError, match="strategy.aggregator: must be 'mean'.*own aggregator"):
        dp_config(**{"strategy.aggregator": "other"})
    # local DP: the server only post-processes noised updates, so any rule is sound
    assert dp_config(**{"privacy.mode": "local", "strategy.aggregator": "other"})


def test_what_dp_allows() -> None:
    dp_config(**{"strategy.name": "fedadam", "privacy.delta": 1e-5})
    dp_config(**{"privacy.mode": "local", "strategy.lora_aggregation": "exact"})
    dp_config(**{"privacy.noise_multiplier": None, "privacy.target_epsilon": 3.0})
    dp_config(**{"partition.num_clients": 1, "privacy.delta": 1e-3})


def test_compare_trains_the_baselines_without_privacy(tmp_path: Path) -> None:
    cfg = dp_config()
    assert Contender("centralized").config(cfg, tmp_path).privacy.mode == "off"
    assert Contender("local:0").config(cfg, tmp_path).privacy.mode == "off"
    assert Contender("fedit").config(cfg, tmp_path).privacy.mode == "central"


def test_resume_may_not_change_the_rounds_sigma_was_searched_for() -> None:
    values = {"privacy.noise_multiplier": None, "privacy.target_epsilon": 3.0}
    saved = dp_config(**values)
    longer = dp_config(**values, **{"federation.rounds": saved.federation.rounds + 5})
    assert any("target_epsilon" in c for c in resume_conflicts(saved, longer))
    fixed = dp_config(**{"federation.rounds": saved.federation.rounds + 5})
    assert resume_conflicts(dp_config(), fixed) == []
