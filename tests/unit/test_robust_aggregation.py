"""The robust aggregation rules against hand-computed values, their aggregators, their
per-round count checks, their state across --resume, and the configs they refuse."""

from __future__ import annotations

import math

import pytest
import torch

from fedit.config import ConfigError, RunConfig, StrategyConfig, load_config
from fedit.server.aggregators import ROBUST_AGGREGATORS, MeanAggregator, build_aggregator
from fedit.server.aggregators.centered_clip import centered_clip
from fedit.server.aggregators.clipping import norm_clipped_mean
from fedit.server.aggregators.krum import krum_scores, multi_krum
from fedit.server.aggregators.median import coordinate_median
from fedit.server.aggregators.robust import TooFewUpdatesError
from fedit.server.aggregators.trimmed_mean import TrimmedMeanAggregator, trimmed_mean
from fedit.server.strategies import build_strategy
from fedit.types import AdapterState, ClientUpdate


def state(a: list[float], b: list[float], dtype: torch.dtype = torch.float32) -> AdapterState:
    """An adapter of two tensors, "a" (2,) and "b" (1,)."""
    return {"a": torch.tensor(a, dtype=dtype), "b": torch.tensor(b, dtype=dtype)}


# Five clients, one outlier (client 4); x = 0 below, so these are also the Δ_k.
HONEST = [state([1, 2], [0]), state([2, 1], [1]), state([3, 3], [2]), state([4, 0], [1])]
OUTLIER = state([100, -100], [50])
DELTAS = [*HONEST, OUTLIER]
WEIGHTS = [0.1, 0.2, 0.3, 0.2, 0.2]
ZERO = state([0, 0], [0])


def updates(deltas: list[AdapterState], x: AdapterState = ZERO) -> list[ClientUpdate]:
    """Clients 0..n-1 whose adapters are y_k = x + Δ_k."""
    return [
        ClientUpdate(k, {key: x[key] + d[key] for key in x}, 10, 1, 0.1)
        for k, d in enumerate(deltas)
    ]


def assert_state(got: AdapterState, a: list[float], b: list[float]) -> None:
    assert got.keys() == {"a", "b"}
    assert torch.allclose(got["a"], torch.tensor(a, dtype=got["a"].dtype), atol=1e-6), got["a"]
    assert torch.allclose(got["b"], torch.tensor(b, dtype=got["b"].dtype), atol=1e-6), got["b"]


def run_config(aggregator: str, **strategy: object) -> RunConfig:
    return RunConfig(strategy=StrategyConfig(aggregator=aggregator, **strategy))


# --- the rules, by hand -----------------------------------------------------------------


def test_coordinate_median_odd_and_even():
    # a[0]: 1 2 3 4 100 -> 3; a[1]: -100 0 1 2 3 -> 1; b: 0 1 1 2 50 -> 1
    assert_state(coordinate_median(DELTAS), [3, 1], [1])
    # four: the mean of the two middle values, a[0]: 2, 3; a[1]: 1, 2; b: 1, 1
    assert_state(coordinate_median(HONEST), [2.5, 1.5], [1])


def test_trimmed_mean_drops_b_at_each_end_per_coordinate():
    # b = 1: a[0] mean(2, 3, 4) = 3; a[1] mean(0, 1, 2) = 1; b mean(1, 1, 2) = 4/3
    assert_state(trimmed_mean(DELTAS, 1), [3, 1], [4 / 3])
    # b = 0 is the unweighted mean: a (110/5, -94/5), b 54/5
    assert_state(trimmed_mean(DELTAS, 0), [22, -18.8], [10.8])
    with pytest.raises(ValueError, match="cannot trim 2 at each end"):
        trimmed_mean(HONEST, 2)


def test_trimmed_mean_trims_at_least_the_fraction():
    rule = TrimmedMeanAggregator(trim_count=None, trim_fraction=0.1)
    assert [rule.trim(n) for n in (5, 10, 11, 30)] == [1, 1, 2, 3]  # 0.1 · 30 is not 3.000...1
    assert TrimmedMeanAggregator(trim_count=2, trim_fraction=0.1).trim(30) == 2


def test_krum_scores_and_choices():
    # squared distances over (a0, a1, b): d01 3, d02 9, d03 14, d12 6, d13 5, d23 11, and
    # d04 22705, d14 22206, d24 22322, d34 21617; n - f - 2 = 2 nearest for f = 1
    assert krum_scores(DELTAS, 1) == [12, 8, 15, 16, 21617 + 22206]
    krum = multi_krum(DELTAS, WEIGHTS, f=1, m=1)
    assert krum.selected == [1]
    assert_state(krum.delta, [2, 1], [1])
    # m = 3: clients 1, 0, 2, averaged with p renormalised: (0.1, 0.2, 0.3) / 0.6
    three = multi_krum(DELTAS, WEIGHTS, f=1, m=3)
    assert three.selected == [0, 1, 2]
    assert_state(three.delta, [1.4 / 0.6, 1.3 / 0.6], [0.8 / 0.6])
    uniform = multi_krum(DELTAS, [0.2] * 5, f=1, m=3)  # the paper's plain mean
    assert_state(uniform.delta, [2, 2], [1])


def test_krum_picks_a_client_of_weight_zero_without_dividing_by_zero():
    krum = multi_krum(DELTAS, [0.25, 0.0, 0.25, 0.25, 0.25], f=1, m=1)
    assert_state(krum.delta, [2, 1], [1])


def test_krum_needs_2f_plus_3_updates():
    with pytest.raises(ValueError, match=r"n >= 2f \+ 3 = 5 updates, got 4"):
        krum_scores(HONEST, 1)
    assert len(krum_scores(HONEST, 0)) == 4  # f = 0: 3 are enough
    with pytest.raises(ValueError, match="1..n - f = 4 of 5 updates, not 5"):
        multi_krum(DELTAS, WEIGHTS, f=1, m=5)


CLIP_DELTAS = [
    state([3, 0], [4]),  # norm 5
    state([0, 0], [1]),  # 1
    state([0, 2], [0]),  # 2: at the bound, not clipped
    state([1, 0], [0]),  # 1
    state([60, 0], [80]),  # 100
]


def test_norm_clipping_bounds_each_update_over_all_its_tensors():
    # C = 2: client 0 scaled by 0.4 -> (1.2, 0), (1.6); client 4 by 0.02 -> the same
    # uniform mean: a (0.2 · 3.4, 0.2 · 2), b 0.2 · 4.2
    assert_state(norm_clipped_mean(CLIP_DELTAS, [0.2] * 5, 2.0), [0.68, 0.4], [0.84])
    weighted = norm_clipped_mean(CLIP_DELTAS, WEIGHTS, 2.0)  # 0.1·1.2 + 0.2·1 + 0.2·1.2
    assert_state(weighted, [0.56, 0.6], [0.16 + 0.2 + 0.32])


def test_norm_clip_aggregator_defaults_to_the_median_norm_and_reports_what_it_clipped():
    aggregator = build_aggregator(run_config("norm_clip"), 5)
    delta = aggregator.delta(ZERO, updates(CLIP_DELTAS), [0.2] * 5, 0)
    assert_state(delta, [0.68, 0.4], [0.84])  # the median of 5, 1, 2, 1, 100 is 2
    assert aggregator.metrics() == {
        "clip_norm": 2.0,
        "clipped": [0, 4],
        "norm_max": 100.0,
        "norm_median": 2.0,
    }


# All on one line through (a, b) = (0.6, 0.8) (a unit vector over both tensors), so that
# Δ_k = t_k·u and centred clipping is scalar.
U = state([0.6, 0.0], [0.8])


def along(t: float) -> AdapterState:
    return {key: t * u for key, u in U.items()}


def test_centered_clipping_iterates_from_the_given_centre():
    deltas = [along(t) for t in (0.6, 2, 3, 2, 100)]
    # v0 = 2, τ = 1.5. Step 1: t − v = −1.4 0 1 0 98 -> clipped −1.4 0 1 0 1.5, mean 0.22:
    # v = 2.22. Step 2: −1.62 −0.22 0.78 −0.22 97.78 -> −1.5 −0.22 0.78 −0.22 1.5, mean
    # 0.068: v = 2.288.
    v, clipped = centered_clip(deltas, [0.2] * 5, along(2), tau=1.5, iterations=2)
    assert_state(v, [2.288 * 0.6, 0], [2.288 * 0.8])
    assert clipped == [0, 4]  # client 0 in step 2 only
    one, clipped_once = centered_clip(deltas, [0.2] * 5, along(2), tau=1.5, iterations=1)
    assert_state(one, [2.22 * 0.6, 0], [2.22 * 0.8])
    assert clipped_once == [4]


def test_centered_clip_aggregator_starts_from_zero_then_from_its_last_aggregate():
    aggregator = build_aggregator(run_config("centered_clip", centered_clip_tau=2.0), 5)
    first = aggregator.delta(ZERO, updates(CLIP_DELTAS), [0.2] * 5, 0)
    assert_state(first, [0.68, 0.4], [0.84])  # from v0 = 0 one step is norm clipping
    assert aggregator.metrics()["clipped"] == [0, 4]
    saved = aggregator.state_dict()
    assert saved.keys() == {"center.a", "center.b"}
    assert torch.equal(saved["center.a"], first["a"])
    aggregator.load_state_dict({})  # reset: the next round starts from zero again
    assert aggregator.state_dict() == {}
    with pytest.raises(ValueError, match="keeps only its centre"):
        aggregator.load_state_dict({"v.a": torch.zeros(2)})


# --- every rule: purity, dtype, the registry --------------------------------------------


@pytest.mark.parametrize("name", ROBUST_AGGREGATORS)
def test_every_rule_leaves_its_inputs_alone_and_returns_float32_for_bf16(name):
    x = state([0.5, -0.25], [1.0], torch.bfloat16)
    sent = updates([state(d["a"].tolist(), d["b"].tolist(), torch.bfloat16) for d in DELTAS], x)
    copies = [{k: t.clone() for k, t in u.state.items()} for u in sent]
    x_copy = {k: t.clone() for k, t in x.items()}
    delta = build_aggregator(run_config(name), 5).delta(x, sent, WEIGHTS, 0)
    assert delta.keys() == x.keys()
    assert all(t.dtype == torch.float32 for t in delta.values())
    for u, copy in zip(sent, copies, strict=True):
        assert all(torch.equal(u.state[k], copy[k]) for k in copy)
    assert all(torch.equal(x[k], x_copy[k]) for k in x)
    # near the honest clients' mean (2.5, 1.5, 1); the weighted mean is (22.2, -18.7, 11)
    assert math.dist([*delta["a"].tolist(), *delta["b"].tolist()], [2.5, 1.5, 1]) < 3


@pytest.mark.parametrize("name", ROBUST_AGGREGATORS)
def test_every_rule_returns_new_tensors_for_float32(name):
    sent = updates(DELTAS)
    delta = build_aggregator(run_config(name), 5).delta(ZERO, sent, WEIGHTS, 0)
    inputs = {id(t) for u in sent for t in u.state.values()} | {id(t) for t in ZERO.values()}
    assert not inputs & {id(t) for t in delta.values()}
    delta["a"].add_(1.0)  # a strategy writing into Δ must not reach a client's tensors
    assert torch.equal(sent[1].state["a"], torch.tensor([2.0, 1.0]))


def test_krum_metrics_name_the_chosen_clients_and_the_scores():
    aggregator = build_aggregator(run_config("krum"), 5)
    aggregator.delta(ZERO, updates(DELTAS), WEIGHTS, 0)
    metrics = aggregator.metrics()
    assert metrics["selected"] == [1]
    assert metrics["scores"] == {"0": 12, "1": 8, "2": 15, "3": 16, "4": 43823}
    multi = build_aggregator(run_config("multi_krum"), 5)  # m unset: n − f = 4
    assert_state(multi.delta(ZERO, updates(DELTAS), [0.2] * 5, 0), [2.5, 1.5], [1])
    assert multi.metrics()["selected"] == [0, 1, 2, 3]


def test_median_metrics_show_how_far_each_client_is():
    aggregator = build_aggregator(run_config("median"), 5)
    aggregator.delta(ZERO, updates(DELTAS), WEIGHTS, 0)
    distances = aggregator.metrics()["distance_to_aggregate"]
    assert distances["1"] == pytest.approx(1.0)  # (2, 1, 1) − (3, 1, 1)
    assert max(distances, key=distances.get) == "4"


# --- too few updates --------------------------------------------------------------------


def test_a_round_with_fewer_updates_than_krum_needs_stops_naming_the_numbers():
    cfg = run_config("krum")
    strategy = build_strategy(cfg.strategy, 5, build_aggregator(cfg, 5))
    with pytest.raises(TooFewUpdatesError) as err:
        strategy.aggregate(ZERO, updates(HONEST), round_index=2)  # e.g. one was rejected
    message = str(err.value)
    assert message.startswith("round 3: strategy.aggregator = 'krum' needs at least 2f + 3 = 5")
    assert "strategy.byzantine_clients = f = 1, got 4" in message
    assert "--resume" in message


@pytest.mark.parametrize(
    ("aggregator", "options", "message"),
    [
        ("krum", {"byzantine_clients": 2}, r"2f \+ 3 = 7 updates .* got 5 per round"),
        ("multi_krum", {"krum_selected": 5}, "krum_selected = 5 is more than n - f = 4"),
        ("trimmed_mean", {"trim_count": 3}, r"trims 3 .*strategy.trim_count.* more than 6"),
        ("trimmed_mean", {"trim_fraction": 0.45}, r"trims 3 .*strategy.trim_fraction"),
    ],
)
def test_too_few_clients_per_round_is_refused_before_training(aggregator, options, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_aggregator(run_config(aggregator, **options), 5)
    assert "federation.clients_per_round (or fraction) gives 5 of 5 clients" in str(err.value)


def test_the_median_of_two_is_refused():
    cfg = run_config("median")
    cfg.federation.clients_per_round = 2
    with pytest.raises(ConfigError, match="needs at least 3 updates"):
        build_aggregator(cfg, 5)


@pytest.mark.parametrize("mode", ["local", "centralized"])
def test_the_baselines_use_the_mean(mode):
    cfg = run_config("krum")
    cfg.federation.mode = mode
    assert type(build_aggregator(cfg, 5)) is MeanAggregator


# --- state across --resume --------------------------------------------------------------


def test_centered_clippings_centre_survives_a_checkpoint_and_reset_clears_it():
    cfg = run_config("centered_clip", name="fedavgm", centered_clip_tau=2.0)
    first = build_strategy(cfg.strategy, 5, build_aggregator(cfg, 5))
    x1 = first.aggregate(ZERO, updates(CLIP_DELTAS), 0)
    saved = first.checkpoint_state()
    assert {"aggregator.center.a", "aggregator.center.b", "v.a", "v.b"} <= saved.keys()
    resumed = build_strategy(cfg.strategy, 5, build_aggregator(cfg, 5))
    resumed.load_checkpoint_state(saved)
    second = updates([along(t) for t in (0.6, 2, 3, 2, 100)], x1)
    expected = first.aggregate(x1, second, 1)
    got = resumed.aggregate(x1, second, 1)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    unsaved = build_strategy(cfg.strategy, 5, build_aggregator(cfg, 5))
    unsaved.load_checkpoint_state({k: t for k, t in saved.items() if k.startswith("v.")})
    different = unsaved.aggregate(x1, second, 1)  # same momentum, centre back at zero
    assert not torch.equal(different["a"], expected["a"])  # the centre matters
    resumed.reset()
    assert resumed.checkpoint_state() == {}


# --- configs refused --------------------------------------------------------------------


def validated(**strategy) -> RunConfig:
    """A run with this [strategy], validated (the refusals are fedit.config.rules')."""
    return load_config(
        None, ["data.path=synthetic", *(f"strategy.{k}={v!r}" for k, v in strategy.items())]
    )


@pytest.mark.parametrize("aggregator", ROBUST_AGGREGATORS)
def test_robust_rules_are_refused_with_scaffold_and_with_exact_lora(aggregator):
    with pytest.raises(ConfigError, match=r"strategy.aggregator: .*'scaffold'.*control variate"):
        validated(name="scaffold", aggregator=aggregator)
    with pytest.raises(ConfigError, match="strategy.aggregator: .*'exact'.*FedEx-LoRA residual"):
        validated(aggregator=aggregator, lora_aggregation="exact")
    validated(name="fedadam", aggregator=aggregator)


def test_the_mean_still_goes_with_scaffold_and_exact():
    validated(name="scaffold", lora_aggregation="exact")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("strategy.byzantine_clients=-1", "strategy.byzantine_clients: must be >= 0"),
        ("strategy.krum_selected=0", "strategy.krum_selected: must be >= 1"),
        ("strategy.trim_fraction=0.5", r"strategy.trim_fraction: must be in \[0, 0.5\)"),
        ("strategy.trim_count=-1", "strategy.trim_count: must be >= 0"),
        ("strategy.clip_norm=0", "strategy.clip_norm: must be positive"),
        ("strategy.centered_clip_tau=-1", "strategy.centered_clip_tau: must be positive"),
        ("strategy.centered_clip_iters=0", "strategy.centered_clip_iters: must be >= 1"),
    ],
)
def test_bad_robust_settings_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.path=synthetic", override])


def test_robust_settings_load_from_overrides():
    cfg = load_config(
        None,
        [
            "data.path=synthetic",
            "strategy.aggregator=multi_krum",
            "strategy.byzantine_clients=2",
            "strategy.krum_selected=3",
            "strategy.clip_norm=0.5",
        ],
    )
    assert (cfg.strategy.byzantine_clients, cfg.strategy.krum_selected) == (2, 3)
    assert cfg.strategy.clip_norm == 0.5
