"""The engines' limits in fedit.config.rules's table: what `fedit train`, a deployment
(coordinate), Flower's Ray runtime (simulate-ray) and `fedit personalize` cannot run, each
checked by ``rules.check(cfg, engine)`` before that engine starts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedit.config.rule import (
    MESSAGING,
    Rule,
    baseline,
    exact,
    mixed_ranks,
    sampled,
)

if TYPE_CHECKING:
    pass


ENGINE_RULES: tuple[Rule, ...] = (
    # The engines' limits.
    Rule(
        ("deploy.clients",),
        lambda c: not c.deploy.clients,
        "list the data owners' public keys (one file each)",
        engines=frozenset({"coordinate"}),
    ),
    Rule(
        ("deploy.clients", "partition.num_clients"),
        lambda c: len(c.deploy.clients) != c.partition.num_clients,
        lambda c: (
            f"{len(c.deploy.clients)} keys, but partition.num_clients is "
            f"{c.partition.num_clients}; they are the same federation"
        ),
        engines=frozenset({"coordinate"}),
    ),
    Rule(
        ("federation.mode",),
        baseline,
        lambda c: f"{c.federation.mode!r} is a baseline of one client; run it with `fedit train`",
        engines=MESSAGING,
    ),
    Rule(
        ("strategy.lora_aggregation",),
        exact,
        (
            "'exact' folds a dense residual into the base weights each round, which the "
            "runtime's workers (fed as a deployment's owners, with adapters only) never receive; "
            "use 'separate', or `fedit train`"
        ),
        engines=frozenset({"simulate-ray"}),
    ),
    Rule(
        ("secagg.enabled",),
        lambda c: c.secagg.enabled,
        (
            "the runtime's workers answer any client's messages, so no client could keep "
            "its secrets from one stage of a secure round to the next, and in one machine the "
            "coordinator holds every update anyway; run secure aggregation with `fedit coordinate`"
        ),
        engines=frozenset({"simulate-ray"}),
    ),
    # Only `fedit train`'s engine measures a candidate's loss (no engine that messages its
    # clients sends a loss query yet), and simulated devices stand in for real ones.
    Rule(
        ("federation.selection",),
        lambda c: c.federation.selection == "power_of_choice",
        (
            "'power_of_choice' needs each candidate's loss before the round, which only "
            "`fedit train`'s engine measures, not a deployment or the Ray runtime; use 'uniform'"
        ),
        engines=MESSAGING,
    ),
    Rule(
        ("system.enabled",),
        lambda c: c.system.enabled,
        (
            "simulated devices drop and time clients in `fedit train`'s engine only; a "
            "deployment or the Ray runtime has real ones (deploy.round_timeout is their deadline)"
        ),
        engines=MESSAGING,
    ),
    Rule(
        ("strategy.lora_aggregation",),
        exact,
        (
            "'exact' folds a dense residual into every owner's base weights each round "
            "(model-sized traffic); deployments use 'separate'"
        ),
        engines=frozenset({"coordinate"}),
    ),
    Rule(
        ("federation.clients_per_round", "secagg.enabled"),
        lambda c: c.secagg.enabled and sampled(c, len(c.deploy.clients)) < 2,
        (
            "secure aggregation (secagg.enabled) needs at least 2 clients a round (the "
            "sum of one client's update is that update)"
        ),
        engines=frozenset({"coordinate"}),
    ),
    Rule(
        ("secagg.enabled",),
        lambda c: c.secagg.enabled,
        (
            "secure aggregation hides each update from a coordinator on another machine; "
            "a simulation trains and aggregates every client in this process, so it has nothing "
            "to hide: run it with `fedit coordinate`, or simulate the same config with "
            "secagg.enabled = false"
        ),
        engines=frozenset({"train"}),
    ),
    # `fedit personalize` covers an SFT federation whose adapter holds the model.
    Rule(
        ("federation.mode",),
        baseline,
        lambda c: f"{c.federation.mode!r} has no clients to personalise",
        engines=frozenset({"personalize"}),
    ),
    Rule(
        ("train.objective",),
        lambda c: c.train.objective != "sft",
        "`fedit personalize` fine-tunes SFT federations only",
        engines=frozenset({"personalize"}),
    ),
    Rule(
        ("strategy.lora_aggregation",),
        exact,
        (
            "'exact' keeps part of the model in a base residual, which local fine-tuning "
            "from the adapter alone would drop; personalise a 'separate' run"
        ),
        engines=frozenset({"personalize"}),
    ),
    Rule(
        ("lora.client_ranks",),
        mixed_ranks,
        "personalising mixed-rank clients is not built yet",
        engines=frozenset({"personalize"}),
    ),
)
