from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

import pytest

from fedit.config import ConfigError, RunConfig, load_config, to_toml
from tests.conftest import SHIPPED_CONFIGS

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


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_validates(path: Path) -> None:
    load_config(path)


def test_the_shipped_configs_include_the_benchmarks() -> None:
    names = {str(p.relative_to(REPO)) for p in SHIPPED_CONFIGS}
    assert {"configs/demo.toml", "bench/configs/w0.toml", "bench/configs/w1.toml"} <= names


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


def float_keys() -> list[str]:
    """section.key of every float field of the run config (optional ones included)."""
    cfg = RunConfig()
    keys = []
    for section in fields(cfg):
        value = getattr(cfg, section.name)
        if is_dataclass(value):
            hints = get_type_hints(type(value))
            keys += [
                f"{section.name}.{f.name}"
                for f in fields(value)
                if float in _types(hints[f.name]) and get_origin(hints[f.name]) is not list
            ]
    return keys


def float_list_keys() -> list[str]:
    """section.key of every list-of-floats field (system.speeds, ...)."""
    cfg = RunConfig()
    return [
        f"{section.name}.{f.name}"
        for section in fields(cfg)
        if is_dataclass(value := getattr(cfg, section.name))
        for f in fields(value)
        if get_type_hints(type(value))[f.name] == list[float]
    ]


@pytest.mark.parametrize("value", ["inf", "nan"])
@pytest.mark.parametrize("key", float_list_keys())
def test_every_listed_float_must_be_finite(key: str, value: str) -> None:
    assert key.startswith(("system.", "lora."))
    with pytest.raises(ConfigError, match=rf"{key}: must be finite numbers, got {value}"):
        load_config(None, ["data.path=x", f"{key}=[1.0, {value}]"])
    with pytest.raises(ConfigError, match=rf"{key}: expected a list of numbers, got {value}"):
        load_config(None, ["data.path=x", f"{key}={value}"])


def _types(hint: object) -> tuple:
    return get_args(hint) or (hint,)


@pytest.mark.parametrize("value", ["inf", "nan"])
@pytest.mark.parametrize("key", float_keys())
def test_every_float_must_be_finite(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key}: must be a finite number, got {value}"):
        load_config(None, ["data.path=x", f"{key}={value}"])


def test_empty_value_unsets_an_optional_key() -> None:
    cfg = load_config(None, ["data.path=x", "train.max_steps=3", "train.max_steps="])
    assert cfg.train.max_steps is None


def optional_keys() -> list[tuple[str, object]]:
    """(section.key, default) of every key that may be unset (its type admits None)."""
    cfg = RunConfig()
    return [
        (f"{section.name}.{f.name}", getattr(value, f.name))
        for section in fields(cfg)
        if is_dataclass(value := getattr(cfg, section.name))
        for f in fields(value)
        if type(None) in _types(get_type_hints(type(value))[f.name])
    ]


@pytest.mark.parametrize(("key", "default"), optional_keys())
def test_every_key_that_can_be_unset_is_unset_by_default(key: str, default: object) -> None:
    """TOML has no null, so a saved config leaves an unset key out and reading it back gives
    the default: only a default of None reads back as the unset value. (train.max_grad_norm,
    default 1.0, once came back as 1.0 after `--set train.max_grad_norm=`: a resumed run or a
    data owner reading the saved config clipped what the run did not.)"""
    assert default is None


def test_a_saved_config_reads_back_equal_whatever_was_unset(tmp_path: Path) -> None:
    overrides = ["data.path=x", "train.max_steps=", "train.max_grad_norm=0"]
    cfg = load_config(None, overrides)
    path = tmp_path / "config.toml"
    path.write_text(to_toml(asdict(cfg)))
    assert load_config(path) == cfg


def test_max_grad_norm_zero_turns_clipping_off() -> None:
    assert load_config(None, ["data.path=x", "train.max_grad_norm=0"]).train.max_grad_norm == 0
    with pytest.raises(ConfigError, match="train.max_grad_norm: must be >= 0"):
        load_config(None, ["data.path=x", "train.max_grad_norm=-1"])


def test_config_file_not_utf8_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b'seed = 1\r\n[data]\r\npath = "d\xc3.jsonl"\r\n')
    with pytest.raises(ConfigError, match=r"c\.toml:3: not valid UTF-8 \(byte 0xc3 at column 10\)"):
        load_config(path)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:3", "mps"])
def test_device_syntax_accepted(device: str) -> None:
    assert load_config(None, ["data.path=x", f"model.device={device}"]).model.device == device


@pytest.mark.parametrize("device", ["banana", "cuda:", "cuda:x", "gpu", "CPU"])
def test_device_syntax_refused(device: str) -> None:
    with pytest.raises(ConfigError, match=r"model.device: unknown device"):
        load_config(None, ["data.path=x", f"model.device={device}"])


def test_an_unknown_attention_implementation_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model.attn_implementation: must be one of sdpa, eager"):
        load_config(None, ["data.path=x", 'model.attn_implementation="flash"'])


def test_strategy_names_come_from_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedit import plugins
    from fedit.server.strategies import STRATEGIES, FedAvg, register

    monkeypatch.setattr(plugins, "STRATEGIES", dict(plugins.STRATEGIES))
    with pytest.raises(ConfigError, match="unknown strategy 'my_avg'"):
        load_config(None, ["data.path=x", "strategy.name=my_avg"])
    register("my_avg")(FedAvg)  # a strategy registered by user code is accepted at once
    try:
        assert load_config(None, ["data.path=x", "strategy.name=my_avg"]).strategy.name == "my_avg"
    finally:
        del STRATEGIES["my_avg"]


DEPLOY = [
    "data.path=x",
    'deploy.clients=["pki/a.pub", "pki/b.pub", "pki/c.pub"]',
    "deploy.min_replies=2",
    "deploy.round_timeout=20",
    'deploy.fleet_address="[::]:9443"',
    "deploy.insecure=true",
]


def test_deploy_defaults_leave_a_run_a_simulation() -> None:
    deploy = load_config(None, ["data.path=x"]).deploy
    assert deploy.clients == [] and deploy.insecure is False
    assert (deploy.fleet_address, deploy.certs_dir) == ("0.0.0.0:9443", "pki")
    assert (deploy.round_timeout, deploy.join_timeout, deploy.min_replies) == (1800.0, 600.0, 1)


def test_deploy_section_round_trips_through_save(tmp_path: Path) -> None:
    cfg = load_config(None, DEPLOY)
    assert cfg.deploy.clients == ["pki/a.pub", "pki/b.pub", "pki/c.pub"]
    assert cfg.deploy.round_timeout == 20.0 and isinstance(cfg.deploy.round_timeout, float)
    cfg.save(tmp_path / "c.toml")
    assert "[deploy]" in (tmp_path / "c.toml").read_text()
    assert load_config(tmp_path / "c.toml") == cfg
    plain = load_config(None, ["data.path=x"])  # an empty roster survives too
    plain.save(tmp_path / "plain.toml")
    assert load_config(tmp_path / "plain.toml") == plain


@pytest.mark.parametrize(
    "address", ["0.0.0.0:9443", "coord.example.org:443", "127.0.0.1:1", "[::1]:65535"]
)
def test_deploy_fleet_address_accepted(address: str) -> None:
    assert load_config(None, ["data.path=x", f'deploy.fleet_address="{address}"'])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('deploy.fleet_address="9443"', r"deploy.fleet_address: expected HOST:PORT"),
        ('deploy.fleet_address="host:"', r"deploy.fleet_address: expected HOST:PORT"),
        ('deploy.fleet_address=":9443"', r"deploy.fleet_address: expected HOST:PORT"),
        ('deploy.fleet_address="host:0"', r"deploy.fleet_address: .*PORT in \[1, 65535\]"),
        ('deploy.fleet_address="host:70000"', r"deploy.fleet_address: .*got 'host:70000'"),
        ('deploy.fleet_address="::1:9443"', r"deploy.fleet_address: expected HOST:PORT"),
        ('deploy.fleet_address="a b:1"', r"deploy.fleet_address: expected HOST:PORT"),
        ("deploy.fleet_address=9443", r"deploy.fleet_address: expected a string"),
        ('deploy.certs_dir=""', r"deploy.certs_dir: must not be empty"),
        ('deploy.clients=["a.pub", ""]', r"deploy.clients: must not hold an empty path"),
        ('deploy.clients=["a.pub", "b.pub", "a.pub"]', r"deploy.clients: lists a.pub more"),
        ("deploy.clients=[1, 2]", r"deploy.clients: expected a list of strings"),
        ("deploy.round_timeout=0", r"deploy.round_timeout: must be positive"),
        ("deploy.round_timeout=-5.0", r"deploy.round_timeout: must be positive"),
        ("deploy.join_timeout=-1", r"deploy.join_timeout: must be >= 0"),
        ("deploy.min_replies=0", r"deploy.min_replies: must be >= 1"),
        ("deploy.min_replies=1.5", r"deploy.min_replies: expected an integer"),
        ('deploy.clients=["a.pub"]', r"deploy.min_replies: must be <= .*deploy.clients \(1\)"),
        ('deploy.insecure="yes"', r"deploy.insecure: expected true/false"),
        ("deploy.nodes=3", r"deploy.nodes: unknown key"),
    ],
)
def test_deploy_bad_values_name_the_field(override: str, message: str) -> None:
    base = ["data.path=x", "deploy.min_replies=2"] if "clients" in override else ["data.path=x"]
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*base, override])
