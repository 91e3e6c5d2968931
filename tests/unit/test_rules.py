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
    "strategy.aggregator x strategy.name": Case(
        [*SCAFFOLD, "strategy.aggregator=median"], ["strategy.aggregator=mean"]
    ),
    "strategy.aggregator x strategy.lora_aggregation": Case(
        [*EXACT, "strategy.aggregator=median"], ["strategy.lora_aggregation=separate"]
    ),
    "federation.local_client x partition.num_clients": Case(
        ["federation.mode=local", "federation.local_client=4"], ["federation.local_client=3"]
    ),
    "federation.clients_per_round x partition.num_clients": Case(
        ["federation.clients_per_round=5"], ["federation.clients_per_round=4"]
    ),
    "compression.upload x federation.mode": Case(
        ["compression.upload=int8", "federation.mode=centralized"], ["compression.upload=none"]
    ),
    "system.speeds x partition.num_clients": Case(
        ["system.speeds=[1.0, 2.0]"], ["system.speeds=[1.0, 2.0, 1.0, 1.0]"]
    ),
    "system.bandwidths_mbps x partition.num_clients": Case(
        ["system.bandwidths_mbps=[20.0]"], ["system.bandwidths_mbps=[20.0, 20.0, 5.0, 5.0]"]
    ),
    "system.availabilities x partition.num_clients": Case(
        ["system.availabilities=[0.5]"], ["system.availabilities=[0.5, 1.0, 1.0, 1.0]"]
    ),
    "federation.selection x system.enabled": Case(
        ["federation.selection=available"], ["system.enabled=true"]
    ),
    "system.enabled x federation.mode": Case(
        ["system.enabled=true", "federation.mode=centralized"], ["federation.mode=federated"]
    ),
    "federation.selection x federation.mode": Case(
        [*POC, "federation.mode=local"], ["federation.mode=federated"]
    ),
    "federation.selection x train.objective": Case([*POC, *DPO], ["train.objective=sft"]),
    "power of choice x privacy": Case([*POC, *LOCAL_DP], ["privacy.mode=off"]),
    "federation.candidates x federation.clients_per_round": Case(
        [*POC, "federation.clients_per_round=3", "federation.candidates=2"],
        ["federation.candidates=3"],
    ),
    "lora.client_ranks x partition.num_clients": Case(
        ["lora.client_ranks=[4, 8]"], ["lora.client_ranks=[4, 8, 8, 4]"]
    ),
    "lora.client_ranks x federation.mode": Case(
        [*MIXED, "federation.mode=local"], ["federation.mode=federated"]
    ),
    "strategy.name x lora.client_ranks": Case([*MIXED, *SCAFFOLD], ["strategy.name=fedavg"]),
    "strategy.rank_aggregation x strategy.lora_aggregation": Case(
        [*MIXED, "strategy.rank_aggregation=holders", *EXACT],
        ["strategy.rank_aggregation=zero_pad"],
    ),
    "strategy.rank_aggregation x privacy.mode": Case(
        [*MIXED, "strategy.rank_aggregation=holders", *CENTRAL_DP],
        ["strategy.rank_aggregation=zero_pad"],
    ),
    "strategy.rank_aggregation x strategy.aggregator": Case(
        [*MIXED, "strategy.rank_aggregation=holders", "strategy.aggregator=median"],
        ["strategy.aggregator=mean"],
    ),
    "secagg.enabled x lora.client_ranks": Case([*MIXED, *SECAGG], ["secagg.enabled=false"]),
    "train.objective x lora.client_ranks": Case([*MIXED, *DPO], ["train.objective=sft"]),
    "federation.mode x lora.shared": Case(
        [*SHARED, "federation.mode=centralized"], ["federation.mode=federated"]
    ),
    "strategy.lora_aggregation x lora.shared": Case(
        [*SHARED, *EXACT], ["strategy.lora_aggregation=separate"]
    ),
    "strategy.name x lora.shared": Case([*SHARED, *SCAFFOLD], ["strategy.name=fedavg"]),
    "lora.client_ranks x lora.shared": Case([*SHARED, *MIXED], ["lora.shared=all"]),
    "secagg.enabled x lora.shared": Case([*SHARED, *SECAGG], ["secagg.enabled=false"]),
    "compression.upload x lora.shared": Case(
        [*SHARED, "compression.upload=int8"], ["compression.upload=none"]
    ),
    "train.objective x lora.shared": Case([*SHARED, *DPO], ["train.objective=sft"]),
    "data.train_on_turns x data.template": Case(
        ["data.train_on_turns=last"], ["data.template=chat"]
    ),
    "data.train_on_turns x data.train_on_prompt": Case(
        ["data.template=chat", "data.train_on_turns=last", "data.train_on_prompt=true"],
        ["data.train_on_prompt=false"],
    ),
    "data.path x train.objective": Case(
        ['data.path=""', "data.preference_path=synthetic"], ["train.objective=dpo"]
    ),
    "data.preference_path x train.objective": Case(
        ["train.objective=dpo"], ["data.preference_path=synthetic"]
    ),
    "dpo.sft_rounds x federation.rounds x train.objective": Case(
        [*DPO, "train.objective=sft_then_dpo", "federation.rounds=3", "dpo.sft_rounds=3"],
        ["dpo.sft_rounds=2"],
    ),
    "dpo.sft_rounds x train.objective": Case(["dpo.sft_rounds=2"], ["dpo.sft_rounds=0"]),
    "dpo.max_prompt_len x data.max_seq_len": Case(
        ["data.preference_path=synthetic", "dpo.max_prompt_len=256"], ["dpo.max_prompt_len=128"]
    ),
    "model.load_in_bits x strategy.lora_aggregation": Case(
        [*EXACT, "model.load_in_bits=4"], ["model.load_in_bits="]
    ),
    "model.dtype x strategy.lora_aggregation": Case(
        [*EXACT, "model.dtype=bfloat16"], ["model.dtype=float32"]
    ),
    "strategy.aggregator x secagg.enabled": Case(
        [*SECAGG, "strategy.aggregator=median"], ["strategy.aggregator=mean"]
    ),
    "strategy.name x secagg.enabled": Case([*SECAGG, *SCAFFOLD], ["strategy.name=fedavg"]),
    "strategy.lora_aggregation x secagg.enabled": Case(
        [*SECAGG, *EXACT], ["strategy.lora_aggregation=separate"]
    ),
    "validation.max_update_norm x secagg.enabled": Case(
        [*SECAGG, "validation.max_update_norm=1.0"], ["validation.max_update_norm="]
    ),
    "privacy.mode x secagg.enabled": Case([*SECAGG, *CENTRAL_DP], ["privacy.mode=local"]),
    "federation.mode x secagg.enabled": Case(
        [*SECAGG, "federation.mode=centralized"], ["federation.mode=federated"]
    ),
    "compression.upload x secagg.enabled": Case(
        [*SECAGG, "compression.upload=int8"], ["compression.upload=none"]
    ),
    "secagg.bits": Case(
        [*SECAGG, "partition.num_clients=300", "secagg.bits=16"], ["secagg.bits=32"]
    ),
    "DP aggregator without DP": Case(["strategy.aggregator=dp_fedavg"], CENTRAL_DP),
    "privacy.delta": Case([*LOCAL_DP, "partition.num_clients=1"], ["privacy.delta=1e-5"]),
    "privacy.mode x federation.mode": Case(
        [*LOCAL_DP, "federation.mode=centralized"], ["federation.mode=federated"]
    ),
    "strategy.weighting x privacy.mode": Case(
        [*LOCAL_DP, "strategy.weighting=examples"], ["strategy.weighting=uniform"]
    ),
    "strategy.name x privacy.mode": Case([*LOCAL_DP, *SCAFFOLD], ["strategy.name=fedavg"]),
    "federation.selection x privacy.mode": Case(
        [*CENTRAL_DP, "federation.selection=available", "system.enabled=true"],
        ["federation.selection=uniform"],
    ),
    "strategy.aggregator x privacy.mode": Case(
        [*CENTRAL_DP, "strategy.aggregator=median"], ["strategy.aggregator=mean"]
    ),
    "strategy.lora_aggregation x privacy.mode": Case(
        [*CENTRAL_DP, *EXACT], ["strategy.lora_aggregation=separate"]
    ),
    "attack.kind x federation.mode": Case(
        ["attack.kind=sign_flip", "attack.clients=[0]", "federation.mode=centralized"],
        ["federation.mode=federated"],
    ),
    "attack.kind x train.objective": Case(
        ["attack.kind=backdoor", "attack.clients=[0]", *DPO], ["train.objective=sft"]
    ),
    "attack.clients x partition.num_clients": Case(
        ["attack.kind=sign_flip", "attack.clients=[4]"], ["attack.clients=[3]"]
    ),
    "deploy.clients [coordinate]": Case([], ROSTER),
    "deploy.clients x partition.num_clients [coordinate]": Case(
        ['deploy.clients=["k0", "k1"]'], ROSTER
    ),
    "federation.mode [coordinate, simulate-ray]": Case(
        [*ROSTER, "federation.mode=local"], ["federation.mode=federated"]
    ),
    "strategy.lora_aggregation [simulate-ray]": Case(EXACT, ["strategy.lora_aggregation=separate"]),
    "secagg.enabled [simulate-ray]": Case(SECAGG, ["secagg.enabled=false"]),
    "federation.selection [coordinate, simulate-ray]": Case(
        [*ROSTER, *POC], ["federation.selection=uniform"]
    ),
    "system.enabled [coordinate, simulate-ray]": Case(
        [*ROSTER, "system.enabled=true"], ["system.enabled=false"]
    ),
    "strategy.lora_aggregation [coordinate]": Case(
        [*ROSTER, *EXACT], ["strategy.lora_aggregation=separate"]
    ),
    "federation.clients_per_round x secagg.enabled [coordinate]": Case(
        [*ROSTER, *SECAGG, "federation.clients_per_round=1"], ["federation.clients_per_round=2"]
    ),
    "data.preference_fields x data.preference_format": Case(
        [*DPO, "data.preference_fields=prompt=q,chosen=a,rejected=b", "data.preference_format=hh"],
        ["data.preference_format=plain"],
    ),
    "secagg.enabled [train]": Case(SECAGG, ["secagg.enabled=false"]),
    "federation.mode [personalize]": Case(["federation.mode=local"], ["federation.mode=federated"]),
    "train.objective [personalize]": Case(DPO, ["train.objective=sft"]),
    "strategy.lora_aggregation [personalize]": Case(EXACT, ["strategy.lora_aggregation=separate"]),
    "lora.client_ranks [personalize]": Case(MIXED, NO_MIXED),
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
    ids = [rule.id for rule in rules.RULES]
    assert len(ids) == len(set(ids)), "two rules share an id"
    assert sorted(ids) == sorted(CASES)


@pytest.mark.parametrize("rule", rules.RULES, ids=lambda rule: rule.id)
def test_each_rule_refuses_its_case_naming_its_fields(rule: Rule) -> None:
    case = CASES[rule.id]
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
            assert rule.applies(as_made_up) == rule.applies(as_scaffold), (rule.id, name)
        if rule.id in scaffold_cases:
            scaffold_error = refusal(config(CASES[rule.id].refused), rule)
            made_up = [o.replace("=scaffold", "=made_up") for o in CASES[rule.id].refused]
            expected = [e.replace("scaffold", "made_up") for e in scaffold_error]
            assert refusal(config(made_up), rule) == expected


def test_no_rule_reads_a_part_by_name() -> None:
    """Rules compare no strategy, aggregator or codec name: they read the parts' traits."""
    for module in ("rules.py", "rule.py", "rules_security.py", "engine_limits.py"):
        assert not name_comparisons(CONFIG_DIR / module), module


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
