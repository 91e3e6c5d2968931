from pathlib import Path

import pytest

from fedit.config import ConfigError, RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_need_a_data_path() -> None:
    with pytest.raises(ConfigError, match="data.path"):
        load_config(None, [])


def test_file_plus_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('seed = 3\n[data]\npath = "x.jsonl"\n[train]\nlearning_rate = 0.001\n')
    cfg = load_config(path, ["train.learning_rate=2e-4", "lora.target_modules=q_proj,v_proj"])
    assert cfg.seed == 3
    assert cfg.train.learning_rate == pytest.approx(2e-4)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.path == "x.jsonl"


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[data]\npath = "x"\n[train]\nlerning_rate = 1.0\n')
    with pytest.raises(ConfigError, match=r"bad.toml: train.lerning_rate: unknown key"):
        load_config(path)


def test_wrong_type_names_field() -> None:
    with pytest.raises(ConfigError, match=r"train.micro_batch_size: expected an integer"):
        load_config(None, ["data.path=x", 'train.micro_batch_size="four"'])


def test_cross_field_validation() -> None:
    with pytest.raises(ConfigError, match="clients_per_round"):
        load_config(
            None, ["data.path=x", "partition.num_clients=3", "federation.clients_per_round=5"]
        )


def test_bad_toml_names_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[data\n")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        load_config(path)


def test_save_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.path=d.jsonl", "train.max_steps=7", "federation.fraction=0.5"])
    cfg.save(tmp_path / "c.toml")
    again = load_config(tmp_path / "c.toml")
    assert again == cfg
    assert isinstance(again, RunConfig)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.load_in_bits=4", "model.load_in_bits: .*strategy.lora_aggregation = 'exact'"),
        ("model.dtype=bfloat16", "model.dtype: .*strategy.lora_aggregation = 'exact'.*float32"),
        ("model.dtype=float16", "model.dtype: .*strategy.lora_aggregation = 'exact'.*float32"),
    ],
)
def test_exact_lora_aggregation_needs_a_full_precision_base(override: str, message: str) -> None:
    exact = ["data.path=synthetic", "strategy.lora_aggregation=exact"]
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*exact, override])
    load_config(None, ["data.path=synthetic", override])  # fine with separate averaging
