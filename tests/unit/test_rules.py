"""fedit.config.rules: the one table of refusals, walked rule by rule.

Every rule has a case here: a config it refuses (with an error naming its fields) and,
added to it, the nearest change that makes the config pass. A rule added to the table
without a case fails test_every_rule_has_a_case.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedit import plugins
from fedit.config import ConfigError, RunConfig, rules
from fedit.config.rule import Rule
from fedit.config.toml_read import build_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "src" / "fedit" / "config"
BASE = ["data.path=synthetic", "partition.num_clients=4"]
ROSTER = ['deploy.clients=["k0", "k1", "k2", "k3"]']
MIXED = ["lora.rank_tiers=[4, 8]", "lora.tier_shares=[0.5, 0.5]"]
NO_MIXED = ["lora.rank_tiers=[]", "lora.tier_shares=[]"]
SHARED = ["lora.shared=A"]
SECAGG = ["secagg.enabled=true"]
LOCAL_DP = ["privacy.mode=local", "privacy.noise_multiplier=1.0", "strategy.weighting=uniform"]
CENTRAL_DP = ["privacy.mode=central", "privacy.noise_multiplier=1.0", "strategy.weighting=uniform"]
DPO = ["train.objective=dpo", "data.preference_path=synthetic"]
SCAFFOLD = ["strategy.name=scaffold"]
EXACT = ["strategy.lora_aggregation=exact"]
POC = ["federation.selection=power_of_choice"]


@dataclass(frozen=True)
class Case:
    refused: list[str]  # overrides (over BASE) the rule refuses
    fixed: list[str]  # added to them: the nearest config it lets pass


CASES: dict[str, Case] = {
    "robust aggregator x client state": Case(
        [*SCAFFOLD, "strategy.aggregator=median"], ["strategy.aggregator=mean"]
    ),
    "robust aggregator x exact": Case(
        [*EXACT, "strategy.aggregator=median"], ["strategy.lora_aggregation=separate"]
    ),
    "local client": Case(
        ["federation.mode=local", "federation.local_client=4"], ["federation.local_client=3"]
    ),
    "clients per round": Case(
        ["federation.clients_per_round=5"], ["federation.clients_per_round=4"]
    ),
    "compression x baseline": Case(
        ["compression.upload=int8", "federation.mode=centralized"], ["compression.upload=none"]
    ),
    "system.speeds per client": Case(
        ["system.speeds=[1.0, 2.0]"], ["system.speeds=[1.0, 2.0, 1.0, 1.0]"]
    ),
    "system.bandwidths_mbps per client": Case(
        ["system.bandwidths_mbps=[20.0]"], ["system.bandwidths_mbps=[20.0, 20.0, 5.0, 5.0]"]
    ),
    "system.availabilities per client": Case(
        ["system.availabilities=[0.5]"], ["system.availabilities=[0.5, 1.0, 1.0, 1.0]"]
    ),
    "available without devices": Case(["federation.selection=available"], ["system.enabled=true"]),
    "devices x baseline": Case(
        ["system.enabled=true", "federation.mode=centralized"], ["federation.mode=federated"]
    ),
    "power of choice x baseline": Case(
        [*POC, "federation.mode=local"], ["federation.mode=federated"]
    ),
    "power of choice x objective": Case([*POC, *DPO], ["train.objective=sft"]),
    "power of choice x privacy": Case([*POC, *LOCAL_DP], ["privacy.mode=off"]),
    "power of choice candidates": Case(
        [*POC, "federation.clients_per_round=3", "federation.candidates=2"],
        ["federation.candidates=3"],
    ),
    "lora.client_ranks per client": Case(
        ["lora.client_ranks=[4, 8]"], ["lora.client_ranks=[4, 8, 8, 4]"]
    ),
    "mixed ranks x baseline": Case(
        [*MIXED, "federation.mode=local"], ["federation.mode=federated"]
    ),
    "mixed ranks x client state": Case([*MIXED, *SCAFFOLD], ["strategy.name=fedavg"]),
    "holders x exact": Case(
        [*MIXED, "strategy.rank_aggregation=holders", *EXACT],
        ["strategy.rank_aggregation=zero_pad"],
    ),
    "holders x central privacy": Case(
        [*MIXED, "strategy.rank_aggregation=holders", *CENTRAL_DP],
        ["strategy.rank_aggregation=zero_pad"],
    ),
    "holders x per-update aggregator": Case(
        [*MIXED, "strategy.rank_aggregation=holders", "strategy.aggregator=median"],
        ["strategy.aggregator=mean"],
    ),
    "mixed ranks x secagg": Case([*MIXED, *SECAGG], ["secagg.enabled=false"]),
    "mixed ranks x objective": Case([*MIXED, *DPO], ["train.objective=sft"]),
    "shared A x baseline": Case(
        [*SHARED, "federation.mode=centralized"], ["federation.mode=federated"]
    ),
    "shared A x exact": Case([*SHARED, *EXACT], ["strategy.lora_aggregation=separate"]),
    "shared A x client state": Case([*SHARED, *SCAFFOLD], ["strategy.name=fedavg"]),
    "shared A x mixed ranks": Case([*SHARED, *MIXED], ["lora.shared=all"]),
    "shared A x secagg": Case([*SHARED, *SECAGG], ["secagg.enabled=false"]),
    "shared A x compression": Case(
        [*SHARED, "compression.upload=int8"], ["compression.upload=none"]
    ),
    "shared A x objective": Case([*SHARED, *DPO], ["train.objective=sft"]),
    "objective needs records": Case(
        ['data.path=""', "data.preference_path=synthetic"], ["train.objective=dpo"]
    ),
    "objective needs pairs": Case(["train.objective=dpo"], ["data.preference_path=synthetic"]),
    "sft rounds": Case(
        [*DPO, "train.objective=sft_then_dpo", "federation.rounds=3", "dpo.sft_rounds=3"],
        ["dpo.sft_rounds=2"],
    ),
    "sft rounds unused": Case(["dpo.sft_rounds=2"], ["dpo.sft_rounds=0"]),
    "prompt length": Case(
        ["data.preference_path=synthetic", "dpo.max_prompt_len=256"], ["dpo.max_prompt_len=128"]
    ),
    "exact x quantised base": Case([*EXACT, "model.load_in_bits=4"], ["model.load_in_bits="]),
    "exact x half precision": Case([*EXACT, "model.dtype=bfloat16"], ["model.dtype=float32"]),
    "secagg x per-update aggregator": Case(
        [*SECAGG, "strategy.aggregator=median"], ["strategy.aggregator=mean"]
    ),
    "secagg x client state": Case([*SECAGG, *SCAFFOLD], ["strategy.name=fedavg"]),
    "secagg x exact": Case([*SECAGG, *EXACT], ["strategy.lora_aggregation=separate"]),
    "secagg x update bound": Case(
        [*SECAGG, "validation.max_update_norm=1.0"], ["validation.max_update_norm="]
    ),
    "secagg x central privacy": Case([*SECAGG, *CENTRAL_DP], ["privacy.mode=local"]),
    "secagg x baseline": Case(
        [*SECAGG, "federation.mode=centralized"], ["federation.mode=federated"]
    ),
    "secagg x compression": Case([*SECAGG, "compression.upload=int8"], ["compression.upload=none"]),
    "secagg levels": Case(
        [*SECAGG, "partition.num_clients=300", "secagg.bits=16"], ["secagg.bits=32"]
    ),
    "DP aggregator without DP": Case(["strategy.aggregator=dp_fedavg"], CENTRAL_DP),
    "DP delta of one client": Case([*LOCAL_DP, "partition.num_clients=1"], ["privacy.delta=1e-5"]),
    "DP x baseline": Case(
        [*LOCAL_DP, "federation.mode=centralized"], ["federation.mode=federated"]
    ),
    "DP x weighting": Case(
        [*LOCAL_DP, "strategy.weighting=examples"], ["strategy.weighting=uniform"]
    ),
    "DP x client state": Case([*LOCAL_DP, *SCAFFOLD], ["strategy.name=fedavg"]),
    "central DP x selection": Case(
        [*CENTRAL_DP, "federation.selection=available", "system.enabled=true"],
        ["federation.selection=uniform"],
    ),
    "central DP x aggregator": Case(
        [*CENTRAL_DP, "strategy.aggregator=median"], ["strategy.aggregator=mean"]
    ),
    "central DP x exact": Case([*CENTRAL_DP, *EXACT], ["strategy.lora_aggregation=separate"]),
    "attack x baseline": Case(
        ["attack.kind=sign_flip", "attack.clients=[0]", "federation.mode=centralized"],
        ["federation.mode=federated"],
    ),
    "data attack x DPO": Case(
        ["attack.kind=backdoor", "attack.clients=[0]", *DPO], ["train.objective=sft"]
    ),
    "attack ids": Case(["attack.kind=sign_flip", "attack.clients=[4]"], ["attack.clients=[3]"]),
    "deployment roster": Case([], ROSTER),
    "deployment roster size": Case(['deploy.clients=["k0", "k1"]'], ROSTER),
    "baseline outside train": Case(
        [*ROSTER, "federation.mode=local"], ["federation.mode=federated"]
    ),
    "Ray runtime x exact": Case(EXACT, ["strategy.lora_aggregation=separate"]),
    "Ray runtime x secagg": Case(SECAGG, ["secagg.enabled=false"]),
    "power of choice outside train": Case([*ROSTER, *POC], ["federation.selection=uniform"]),
    "devices outside train": Case([*ROSTER, "system.enabled=true"], ["system.enabled=false"]),
    "deployment x exact": Case([*ROSTER, *EXACT], ["strategy.lora_aggregation=separate"]),
    "deployment secagg of one client": Case(
        [*ROSTER, *SECAGG, "federation.clients_per_round=1"], ["federation.clients_per_round=2"]
    ),
    "in-process secagg": Case(SECAGG, ["secagg.enabled=false"]),
    "personalize baseline": Case(["federation.mode=local"], ["federation.mode=federated"]),
    "personalize objective": Case(DPO, ["train.objective=sft"]),
    "personalize exact": Case(EXACT, ["strategy.lora_aggregation=separate"]),
    "personalize mixed ranks": Case(MIXED, NO_MIXED),
}


def config(overrides: list[str]) -> RunConfig:
    return build_config({}, [*BASE, *overrides])  # not validated yet


def refusal(cfg: RunConfig, rule: Rule) -> list[str]:
    """The errors `cfg` meets where `rule` is checked (validation, or each of its engines)."""
    errors = []
    for engine in sorted(rule.engines) or [None]:
        with pytest.raises(ConfigError) as raised:
            cfg.validate() if engine is None else rules.check(cfg.validate(), engine)
        errors.append(str(raised.value))
    return errors


def passes(cfg: RunConfig, rule: Rule) -> None:
    cfg.validate()
    for engine in rule.engines:
        rules.check(cfg, engine)


def test_every_rule_has_a_case() -> None:
    names = [rule.name for rule in rules.RULES]
    assert len(names) == len(set(names)), "two rules share a name"
    assert sorted(names) == sorted(CASES)


@pytest.mark.parametrize("rule", rules.RULES, ids=lambda rule: rule.name)
def test_each_rule_refuses_its_case_naming_its_fields(rule: Rule) -> None:
    case = CASES[rule.name]
    cfg = config(case.refused)
    assert rule.applies(cfg)
    for error in refusal(cfg, rule):
        assert error == str(rule.error(cfg)), "another rule refused the case first"
        assert error.startswith(f"{rule.keys[0]}: ")
        assert all(key in error for key in rule.keys), (rule.keys, error)
    fixed = config([*case.refused, *case.fixed])
    assert not rule.applies(fixed)
    passes(fixed, rule)


def test_engine_limits_hold_for_their_engines_only() -> None:
    """`fedit train` runs what a deployment refuses; validation alone checks no engine."""
    cfg = config([*ROSTER, *POC, "system.enabled=true"]).validate()
    rules.check(cfg, "train")
    rules.check(cfg, "personalize")
    with pytest.raises(ConfigError, match="federation.selection: 'power_of_choice' needs"):
        rules.check(cfg, "coordinate")
    with pytest.raises(ValueError, match="unknown engine"):
        rules.check(cfg, "deploy")  # type: ignore[arg-type]


def test_a_strategy_with_client_state_is_refused_exactly_as_scaffold(monkeypatch) -> None:
    """Registering a made-up strategy that keeps per-client state is all it takes for every
    rule to treat it as SCAFFOLD: same rules, same messages but for the name."""
    from fedit.server.strategies import STRATEGIES, register
    from fedit.server.strategies.scaffold import Scaffold

    monkeypatch.setattr(plugins, "STRATEGIES", dict(plugins.STRATEGIES))
    monkeypatch.setattr("fedit.server.strategies.STRATEGIES", dict(STRATEGIES))
    register("made_up", plugins.StrategyTraits(client_state=True))(Scaffold)
    scaffold_cases = {n: c for n, c in CASES.items() if "strategy.name=scaffold" in c.refused}
    assert len(scaffold_cases) == 5  # mixed ranks, FedSA, secagg, DP, robust rules
    for rule in rules.RULES:
        for name, case in scaffold_cases.items():
            made_up = [o.replace("=scaffold", "=made_up") for o in case.refused]
            as_scaffold, as_made_up = config(case.refused), config(made_up)
            assert rule.applies(as_made_up) == rule.applies(as_scaffold), (rule.name, name)
        if rule.name in scaffold_cases:
            scaffold_error = refusal(config(CASES[rule.name].refused), rule)
            made_up = [o.replace("=scaffold", "=made_up") for o in CASES[rule.name].refused]
            expected = [e.replace("scaffold", "made_up") for e in scaffold_error]
            assert refusal(config(made_up), rule) == expected


def test_no_rule_reads_a_part_by_name() -> None:
    """Rules compare no strategy, aggregator or codec name: they read the parts' traits."""
    assert not name_comparisons(CONFIG_DIR / "rules.py")
    assert not name_comparisons(CONFIG_DIR / "rule.py")


def name_comparisons(path: Path) -> list[str]:
    """The comparisons in `path` that read strategy.name, strategy.aggregator or
    compression.upload (the parts' names)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(
                isinstance(o, ast.Attribute) and o.attr in ("name", "aggregator", "upload")
                for o in operands
            ):
                found.append(ast.unparse(node))
    return found
