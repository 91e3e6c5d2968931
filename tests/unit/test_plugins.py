"""fedit.plugins: the names and traits the config checks, without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedit import plugins
from fedit.config import ConfigError, load_config
from tests.conftest import SHIPPED_CONFIGS

REPO = Path(__file__).resolve().parents[2]


def test_validating_every_shipped_config_imports_no_torch() -> None:
    """A data owner or `fedit partition` checks a config without loading the algorithms."""
    configs = [str(p) for p in SHIPPED_CONFIGS]
    assert configs
    code = (
        "import sys\nfrom fedit.config import load_config\n"
        f"for path in {configs!r}:\n    load_config(path)\n"
        "assert 'torch' not in sys.modules, 'validating a config imported torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_registries_build_exactly_the_declared_parts() -> None:
    from fedit.server.aggregators import AGGREGATORS
    from fedit.server.strategies import STRATEGIES

    assert set(STRATEGIES) == set(plugins.STRATEGIES)
    assert set(AGGREGATORS) == set(plugins.AGGREGATORS)


def test_a_strategy_registered_at_run_time_is_checked_by_its_traits(monkeypatch) -> None:
    """A new strategy with per-client state is valid by name and refused where SCAFFOLD is,
    with nothing edited but its registration."""
    from fedit.server.strategies import STRATEGIES, register
    from fedit.server.strategies.scaffold import Scaffold

    monkeypatch.setattr(plugins, "STRATEGIES", dict(plugins.STRATEGIES))
    register("mine", plugins.StrategyTraits(client_state=True))(Scaffold)
    try:
        assert load_config(None, ["data.path=synthetic", "strategy.name=mine"])
        with pytest.raises(ConfigError, match="strategy.aggregator: 'median' cannot protect"):
            load_config(
                None, ["data.path=synthetic", "strategy.name=mine", "strategy.aggregator=median"]
            )
    finally:
        STRATEGIES.pop("mine")


def test_a_built_in_name_cannot_be_declared_with_other_traits() -> None:
    with pytest.raises(ValueError, match="other traits"):
        plugins.declare_strategy("scaffold", plugins.StrategyTraits(client_state=False))
    with pytest.raises(ValueError, match="other traits"):
        plugins.declare_aggregator("median", plugins.AggregatorTraits(robust=False))
