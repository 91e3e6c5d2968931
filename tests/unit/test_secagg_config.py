"""[secagg]: its own ranges, and the combinations secure aggregation cannot serve, each
refused with the field named."""

from __future__ import annotations

import pytest

from fedit.config import ConfigError, load_config

ON = ["data.path=synthetic", "secagg.enabled=true"]


def test_secure_aggregation_is_off_by_default_and_its_defaults_validate() -> None:
    assert load_config(None, ["data.path=synthetic"]).secagg.enabled is False
    cfg = load_config(None, ON)
    assert (cfg.secagg.bits, cfg.secagg.neighbours, cfg.secagg.threshold) == (32, 0, 0)


@pytest.mark.parametrize(
    "override, field",
    [
        ("secagg.bits=8", "secagg.bits"),
        ("secagg.bits=63", "secagg.bits"),
        ("secagg.clip_range=0", "secagg.clip_range"),
        ("secagg.clip_range=inf", "secagg.clip_range"),
        ("secagg.neighbours=3", "secagg.neighbours"),
        ("secagg.neighbours=-2", "secagg.neighbours"),
        ("secagg.threshold=1", "secagg.threshold"),
        ("secagg.stage_timeout=0", "secagg.stage_timeout"),
    ],
)
def test_out_of_range_values_name_their_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [*ON, override])


def test_the_threshold_must_be_a_majority_of_the_shareholders() -> None:
    with pytest.raises(ConfigError, match=r"secagg\.threshold: must be in \(2\.5, 5\]"):
        load_config(None, [*ON, "secagg.neighbours=4", "secagg.threshold=2"])
    with pytest.raises(ConfigError, match=r"secagg\.threshold"):
        load_config(None, [*ON, "secagg.neighbours=4", "secagg.threshold=6"])
    assert load_config(None, [*ON, "secagg.neighbours=4", "secagg.threshold=3"])


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["strategy.aggregator=median"], "strategy.aggregator"),
        (["strategy.aggregator=krum", "partition.num_clients=5"], "strategy.aggregator"),
        (["strategy.name=scaffold"], "strategy.name"),
        (["strategy.lora_aggregation=exact", "model.dtype=float32"], "strategy.lora_aggregation"),
        (["validation.max_update_norm=1.0"], "validation.max_update_norm"),
        (
            ["privacy.mode=central", "privacy.noise_multiplier=1.0", "strategy.weighting=uniform"],
            "privacy.mode",
        ),
        (["federation.mode=local"], "federation.mode"),
    ],
)
def test_combinations_that_need_single_updates_are_refused(
    overrides: list[str], field: str
) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.") + ".*secagg"):
        load_config(None, [*ON, *overrides])
    load_config(None, ["data.path=synthetic", *overrides])  # fine without secure aggregation


def test_local_differential_privacy_composes_with_it() -> None:
    cfg = load_config(
        None,
        [*ON, "privacy.mode=local", "privacy.noise_multiplier=1.0", "strategy.weighting=uniform"],
    )
    assert cfg.privacy.mode == "local" and cfg.secagg.enabled


def test_a_resume_may_change_how_long_the_stages_wait_and_nothing_else_of_it() -> None:
    from fedit.engine.run_dir import resume_conflicts

    saved = load_config(None, ON)
    waits = load_config(None, [*ON, "secagg.stage_timeout=30"])
    assert resume_conflicts(saved, waits) == []
    fewer_bits = load_config(None, [*ON, "secagg.bits=24"])
    assert resume_conflicts(saved, fewer_bits) == ["secagg.bits (32 -> 24)"]


def test_too_few_levels_for_the_clients_of_a_round_are_refused() -> None:
    """m inputs share the 2**bits of the sum: too many clients for the bits would leave an
    entry a handful of levels (or none: a division by zero in the quantiser)."""
    from fedit.deploy.secagg.crypto import MIN_LEVELS, RoundParams

    many = ["partition.num_clients=70000", "federation.clients_per_round=70000"]
    with pytest.raises(ConfigError, match=r"secagg\.bits: .*70000 clients"):
        load_config(None, [*ON, "secagg.bits=16", *many])
    load_config(None, [*ON, "secagg.bits=32", *many])
    assert RoundParams(16, 1.0, 257).levels >= MIN_LEVELS
    with pytest.raises(ValueError, match="secagg.bits = 16"):
        RoundParams(16, 1.0, 70000)
