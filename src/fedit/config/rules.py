"""Every refusal of one feature by another, and every engine's limits, in one table
(``RULES``: the feature rules here, then the protections' rules of
fedit.config.rules_security and the engines' limits of fedit.config.engine_limits, in that
order, which is the order errors are reported in).

A rule (fedit.config.rule.Rule) names the fields it is about, when it applies (refuses
a config) and why. A rule without `engines` holds for every run and is checked when a
config is validated; the others are the limits of the engines named (train, coordinate,
simulate-ray, personalize), checked by ``check(cfg, engine)`` before that engine starts.
Rules read the traits of strategies and aggregators (fedit.plugins), never their names:
a strategy registered with per-client state is refused wherever SCAFFOLD is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedit.config.engine_limits import ENGINE_RULES
from fedit.config.rule import (
    ENGINES,
    MIXED,
    Engine,
    Rule,
    baseline,
    exact,
    holders,
    known_clients,
    mixed_ranks,
    one_per_client,
    sampled,
    shared_a,
)
from fedit.config.rules_security import SECURITY_RULES

if TYPE_CHECKING:
    from fedit.config.run import RunConfig


def check(cfg: RunConfig, engine: Engine | None = None) -> None:
    """Raise the error of the first rule that refuses `cfg`: of the rules every run obeys
    (no engine: RunConfig.validate checks these), or of `engine`'s limits."""
    if engine is not None and engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r} (known: {', '.join(ENGINES)})")
    for rule in RULES:
        if (engine in rule.engines if engine else not rule.engines) and rule.applies(cfg):
            raise rule.error(cfg)


RULES: tuple[Rule, ...] = (
    # What the robust aggregators cannot protect (fedit.server.aggregators).
    Rule(
        ("strategy.aggregator", "strategy.name"),
        lambda c: c.strategy.aggregator_traits.robust and c.strategy.client_state,
        lambda c: (
            f"{c.strategy.aggregator!r} cannot protect strategy.name = {c.strategy.name!r}: its "
            "per-client state (SCAFFOLD's control variate c, the plain mean of the clients' "
            "control deltas) passes no rule on the updates, and every client applies it to each "
            "local gradient, so one Byzantine client still steers all of them; use a strategy "
            "without per-client state (fedavg, fedprox or fedavgm)"
        ),
    ),
    Rule(
        ("strategy.aggregator", "strategy.lora_aggregation"),
        lambda c: c.strategy.aggregator_traits.robust and exact(c),
        lambda c: (
            f"{c.strategy.aggregator!r} cannot be used with strategy.lora_aggregation = "
            "'exact': the FedEx-LoRA residual re-adds every client's B_k A_k with weight p_k, "
            "undoing what the rule left out or clipped; use lora_aggregation = 'separate'"
        ),
    ),
    # The population.
    Rule(
        ("federation.local_client", "partition.num_clients"),
        lambda c: (
            c.federation.mode == "local" and c.federation.local_client >= c.partition.num_clients
        ),
        lambda c: f"must be < partition.num_clients ({c.partition.num_clients})",
    ),
    Rule(
        ("federation.clients_per_round", "partition.num_clients"),
        lambda c: (
            c.federation.clients_per_round is not None
            and c.federation.clients_per_round > c.partition.num_clients
        ),
        lambda c: f"must be <= partition.num_clients ({c.partition.num_clients})",
    ),
    Rule(
        ("compression.upload", "federation.mode"),
        lambda c: c.compression.encoded and baseline(c),
        lambda c: (
            f"applies to federation.mode = 'federated' only, not {c.federation.mode!r} "
            "(a baseline sends nothing)"
        ),
    ),
    # Simulated devices (fedit.fleet.devices).
    one_per_client("system.speeds"),
    one_per_client("system.bandwidths_mbps"),
    one_per_client("system.availabilities"),
    Rule(
        ("federation.selection", "system.enabled"),
        lambda c: c.federation.selection == "available" and not c.system.enabled,
        "'available' selects among the simulated devices online: set system.enabled",
    ),
    Rule(
        ("system.enabled", "federation.mode"),
        lambda c: c.system.enabled and baseline(c),
        lambda c: (
            "simulates a federation's devices, not the baseline federation.mode = "
            f"{c.federation.mode!r}"
        ),
    ),
    # Power-of-choice selection: its loss probe reads SFT records, outside any DP analysis.
    Rule(
        ("federation.selection", "federation.mode"),
        lambda c: c.federation.selection == "power_of_choice" and baseline(c),
        lambda c: (
            "'power_of_choice' selects a federation's clients, not the baseline "
            f"federation.mode = {c.federation.mode!r}'s"
        ),
    ),
    Rule(
        ("federation.selection", "train.objective"),
        lambda c: c.federation.selection == "power_of_choice" and c.train.objective != "sft",
        "'power_of_choice' ranks clients by their SFT loss: train.objective must be 'sft'",
    ),
    Rule(
        ("federation.selection", "privacy.mode"),
        lambda c: c.federation.selection == "power_of_choice" and c.privacy.mode != "off",
        (
            "'power_of_choice' cannot be used with privacy.mode: each candidate's loss on "
            "its records reaches the server outside the DP analysis"
        ),
        name="power of choice x privacy",
    ),
    Rule(
        ("federation.candidates", "federation.clients_per_round"),
        lambda c: (
            c.federation.selection == "power_of_choice"
            and c.federation.candidates is not None
            and known_clients(c)
            and c.federation.candidates < sampled(c)
        ),
        lambda c: (
            f"must be >= the {sampled(c)} clients a round selects "
            "(federation.clients_per_round or fraction)"
        ),
    ),
    # Mixed LoRA ranks (fedit.ops.ranks): one rank per client, and no algorithm whose
    # per-client state or server step would move the components a client lacks.
    one_per_client("lora.client_ranks"),
    Rule(
        ("lora.client_ranks", "federation.mode"),
        lambda c: mixed_ranks(c) and baseline(c),
        lambda c: (
            "mixed ranks are a federation's, not the baseline federation.mode = "
            f"{c.federation.mode!r}'s"
        ),
    ),
    Rule(
        ("strategy.name", "lora.client_ranks"),
        lambda c: mixed_ranks(c) and c.strategy.client_state,
        lambda c: (
            f"{c.strategy.name} cannot be used with {MIXED}: its per-client state (e.g. "
            "SCAFFOLD's control variates) would move the components a client does not have"
        ),
    ),
    Rule(
        ("strategy.rank_aggregation", "strategy.lora_aggregation"),
        lambda c: holders(c) and exact(c),
        (
            "'holders' fills in the components a client lacks, so "
            "strategy.lora_aggregation = 'exact' would not be the clients' own products: use "
            "'zero_pad' (with 'exact': FLoRA's exact sum of every client's B_k A_k)"
        ),
    ),
    # 'holders' copies the holders' mean of a component into every other client's update
    # before the aggregator runs, so one client's values enter many updates: sound for the
    # plain mean only (local DP is sound too: it fills in released updates).
    Rule(
        ("strategy.rank_aggregation", "privacy.mode"),
        lambda c: holders(c) and c.privacy.mode == "central",
        (
            "'holders' copies one client's components into the other clients' deltas "
            "before central DP clips them, so replacing one client moves the sum by up to m·2C, "
            "not the 2C privacy.mode = 'central' accounts for: use 'zero_pad'"
        ),
    ),
    Rule(
        ("strategy.rank_aggregation", "strategy.aggregator"),
        lambda c: holders(c) and c.strategy.aggregator_traits.needs_plain_updates,
        lambda c: (
            "'holders' copies the holders' plain mean into every update before "
            f"strategy.aggregator = {c.strategy.aggregator!r} runs, so one Byzantine holder "
            "decides a component for all: use 'zero_pad'"
        ),
    ),
    Rule(
        ("secagg.enabled", "lora.client_ranks"),
        lambda c: mixed_ranks(c) and c.secagg.enabled,
        f"{MIXED} need each client's update to know which components it holds",
    ),
    Rule(
        ("train.objective", "lora.client_ranks"),
        lambda c: mixed_ranks(c) and c.train.objective != "sft",
        f"{MIXED} train SFT only: a DPO reference model at each client's rank is not built yet",
    ),
    # FedSA-LoRA (lora.shared = "A"): the server step and messages need no client's B.
    Rule(
        ("federation.mode", "lora.shared"),
        lambda c: shared_a(c) and baseline(c),
        lambda c: (
            f"lora.shared = 'A' is a federation's; the {c.federation.mode!r} baseline "
            "has no clients to keep factors"
        ),
    ),
    Rule(
        ("strategy.lora_aggregation", "lora.shared"),
        lambda c: shared_a(c) and exact(c),
        (
            "'exact' folds every client's B_k A_k into the base; under lora.shared = "
            "'A' the server never sees a B_k: use 'separate'"
        ),
    ),
    Rule(
        ("strategy.name", "lora.shared"),
        lambda c: shared_a(c) and c.strategy.client_state,
        lambda c: (
            f"{c.strategy.name}'s per-client state (e.g. SCAFFOLD's control variates) "
            "would correct the B factors each client keeps under lora.shared = 'A'"
        ),
    ),
    Rule(
        ("lora.client_ranks", "lora.shared"),
        lambda c: shared_a(c) and mixed_ranks(c),
        "mixed LoRA ranks with lora.shared = 'A' are not built yet",
    ),
    Rule(
        ("secagg.enabled", "lora.shared"),
        lambda c: shared_a(c) and c.secagg.enabled,
        "secure aggregation masks whole adapters; with lora.shared = 'A' not built yet",
    ),
    Rule(
        ("compression.upload", "lora.shared"),
        lambda c: shared_a(c) and c.compression.encoded,
        (
            "compressing the A factors alone is not built yet; lora.shared = 'A' already "
            "sends half of the adapter"
        ),
    ),
    Rule(
        ("train.objective", "lora.shared"),
        lambda c: shared_a(c) and c.train.objective != "sft",
        (
            "lora.shared = 'A' is scored per client on held-out SFT loss "
            "(`fedit personalize`): SFT only"
        ),
    ),
    Rule(
        ("data.train_on_turns", "data.template"),
        lambda c: c.data.train_on_turns == "last" and c.data.template != "chat",
        "'last' picks among a conversation's turns, which only data.template = 'chat' renders",
    ),
    Rule(
        ("data.train_on_turns", "data.train_on_prompt"),
        lambda c: c.data.train_on_turns == "last" and c.data.train_on_prompt,
        "'last' leaves earlier turns out of the loss; data.train_on_prompt puts it on all",
    ),
    # Which data each objective needs, and the DPO limits that depend on other sections.
    Rule(
        ("data.path", "train.objective"),
        lambda c: c.train.objective in ("sft", "sft_then_dpo") and not c.data.path,
        lambda c: (
            f"is required for train.objective = {c.train.objective!r} (a file, a dataset "
            "name or 'synthetic')"
        ),
    ),
    Rule(
        ("data.preference_fields", "data.preference_format"),
        lambda c: (
            bool(c.data.preference_fields.strip())
            and c.data.preference_format not in ("auto", "plain")
        ),
        lambda c: (
            "maps the keys of plain pairs (prompt, chosen, rejected as strings); "
            f"data.preference_format = {c.data.preference_format!r} has its own fixed keys, "
            "so use 'plain' (or 'auto') with a field map"
        ),
    ),
    Rule(
        ("data.preference_path", "train.objective"),
        lambda c: c.train.objective in ("dpo", "sft_then_dpo") and not c.data.preference_path,
        lambda c: (
            f"is required for train.objective = {c.train.objective!r} (a file, a dataset "
            "name or 'synthetic')"
        ),
    ),
    Rule(
        ("dpo.sft_rounds", "federation.rounds", "train.objective"),
        lambda c: (
            c.train.objective == "sft_then_dpo" and not 1 <= c.dpo.sft_rounds < c.federation.rounds
        ),
        lambda c: (
            f"must be in [1, federation.rounds) = [1, {c.federation.rounds}) for "
            "train.objective = 'sft_then_dpo'"
        ),
    ),
    Rule(
        ("dpo.sft_rounds", "train.objective"),
        lambda c: c.train.objective != "sft_then_dpo" and c.dpo.sft_rounds != 0,
        "is only used with train.objective = 'sft_then_dpo'; leave it at 0",
    ),
    Rule(
        ("dpo.max_prompt_len", "data.max_seq_len"),
        lambda c: bool(c.data.preference_path) and c.dpo.max_prompt_len >= c.data.max_seq_len,
        lambda c: f"must be < data.max_seq_len ({c.data.max_seq_len}) to leave room for responses",
    ),
    # Exact LoRA aggregation folds small residuals into the base weights: they must be
    # stored in full precision (fedit.ops.lora_aggregation).
    Rule(
        ("model.load_in_bits", "strategy.lora_aggregation"),
        lambda c: exact(c) and c.model.load_in_bits is not None,
        (
            "cannot be used with strategy.lora_aggregation = 'exact' (quantised base "
            "weights cannot hold the residual); unset it or use lora_aggregation = 'separate'"
        ),
    ),
    Rule(
        ("model.dtype", "strategy.lora_aggregation"),
        lambda c: exact(c) and c.model.dtype in ("bfloat16", "float16"),
        lambda c: (
            f"{c.model.dtype} would round away the residual that "
            "strategy.lora_aggregation = 'exact' folds into the base weights; set model.dtype = "
            '"float32"'
        ),
    ),
    *SECURITY_RULES,
    *ENGINE_RULES,
)
