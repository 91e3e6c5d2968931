"""DPO parts of the run config: train.objective, [dpo], data.preference_*; errors name fields."""

from pathlib import Path

import pytest

from fedit.config import ConfigError, load_config

DPO = ["data.preference_path=synthetic", "train.objective=dpo"]


def test_pure_dpo_needs_no_sft_data_and_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, [*DPO, "dpo.beta=0.2", "dpo.reference=round_start"])
    assert (cfg.data.path, cfg.train.objective, cfg.dpo.beta) == ("", "dpo", 0.2)
    cfg.save(tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml") == cfg


def test_sft_then_dpo_defaults() -> None:
    cfg = load_config(
        None,
        ["data.path=synthetic", *DPO, "train.objective=sft_then_dpo", "dpo.sft_rounds=2"],
    )
    assert (cfg.dpo.sft_rounds, cfg.dpo.loss_type, cfg.dpo.reference) == (2, "sigmoid", "base")
    assert cfg.data.preference_format == "auto"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["train.objective=ppo"], "train.objective"),
        (["dpo.beta=0"], "dpo.beta"),
        (["dpo.label_smoothing=0.5"], "dpo.label_smoothing"),
        (["dpo.loss_type=hinge"], "dpo.loss_type"),
        (["dpo.loss_type=ipo", "dpo.label_smoothing=0.1"], "dpo.label_smoothing"),
        (["dpo.reference=policy"], "dpo.reference"),
        (["dpo.max_prompt_len=0"], "dpo.max_prompt_len"),
        (["dpo.max_prompt_len=300", "data.max_seq_len=256"], "dpo.max_prompt_len"),
        (["dpo.sft_rounds=-1"], "dpo.sft_rounds"),
        (["dpo.sft_rounds=2"], "dpo.sft_rounds"),  # only with sft_then_dpo
        (["data.preference_format=sharegpt"], "data.preference_format"),
        (['dpo.beta="high"'], "dpo.beta"),
        (["dpo.gamma=1"], "dpo.gamma"),
    ],
)
def test_bad_dpo_settings_name_their_field(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^defaults: {field}: "):
        load_config(None, [*DPO, *overrides])


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["train.objective=dpo", "data.path=synthetic"], "data.preference_path"),
        (["train.objective=sft_then_dpo", "data.preference_path=synthetic"], "data.path"),
        (["train.objective=sft", "data.preference_path=synthetic"], "data.path"),
        (
            ["train.objective=sft_then_dpo", "data.path=synthetic", *DPO[:1], "dpo.sft_rounds=0"],
            "dpo.sft_rounds",
        ),
        (
            ["train.objective=sft_then_dpo", "data.path=synthetic", *DPO[:1], "dpo.sft_rounds=10"],
            "dpo.sft_rounds",  # federation.rounds is 10: no DPO round would be left
        ),
    ],
)
def test_each_objective_needs_its_data(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^defaults: {field}: "):
        load_config(None, overrides)
