"""The rules of fedit.config.rules's table that keep a run's protections sound: secure
aggregation, differential privacy and the attack harness (in the table after the feature
rules, before the engines' limits)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedit.config.rule import (
    SECAGG,
    Rule,
    baseline,
    exact,
    known_clients,
    sampled,
    secagg_levels,
)
from fedit.config.security import DATA_ATTACKS

if TYPE_CHECKING:
    pass


SECURITY_RULES: tuple[Rule, ...] = (
    # Secure aggregation: the coordinator sees the sum of the updates only.
    Rule(
        ("strategy.aggregator", "secagg.enabled"),
        lambda c: c.secagg.enabled and c.strategy.aggregator_traits.needs_plain_updates,
        lambda c: (
            f"must be 'mean' {SECAGG}, and {c.strategy.aggregator!r} needs the single updates"
        ),
    ),
    Rule(
        ("strategy.name", "secagg.enabled"),
        lambda c: c.secagg.enabled and c.strategy.client_state,
        lambda c: (
            f"{c.strategy.name} cannot be used {SECAGG}: it needs each client's own "
            "state (e.g. SCAFFOLD's control variate)"
        ),
    ),
    Rule(
        ("strategy.lora_aggregation", "secagg.enabled"),
        lambda c: c.secagg.enabled and exact(c),
        f"must be 'separate' {SECAGG}: 'exact' needs each client's factors",
    ),
    Rule(
        ("validation.max_update_norm", "secagg.enabled"),
        lambda c: c.secagg.enabled and c.validation.max_update_norm is not None,
        (
            f"must be unset {SECAGG}: the bound needs each plaintext update (the "
            "quantiser clips every entry to secagg.clip_range instead)"
        ),
    ),
    Rule(
        ("privacy.mode", "secagg.enabled"),
        lambda c: c.secagg.enabled and c.privacy.mode == "central",
        (
            f"'central' cannot be used {SECAGG}: its clipping of each update is the "
            "server's, so it would have to trust every client's; use 'local'"
        ),
    ),
    Rule(
        ("federation.mode", "secagg.enabled"),
        lambda c: c.secagg.enabled and baseline(c),
        lambda c: (
            f"{c.federation.mode!r} is a baseline of one client: secagg.enabled has "
            "nothing to aggregate"
        ),
    ),
    Rule(
        ("compression.upload", "secagg.enabled"),
        lambda c: c.secagg.enabled and c.compression.encoded,
        (
            f"must be 'none' {SECAGG}: each client sends its masked, quantised vector "
            "(secagg.bits per entry) in place of an encoded update"
        ),
    ),
    Rule(
        ("secagg.bits",),
        lambda c: c.secagg.enabled and known_clients(c) and secagg_levels(c) < 255,
        lambda c: (
            f"{c.secagg.bits} bits leave the sum of {sampled(c)} clients "
            f"{secagg_levels(c)} quantisation levels per entry, fewer than 8-bit quantisation's "
            "255: raise it"
        ),
    ),
    # Differential privacy: the combinations whose releases its analysis does not cover.
    Rule(
        ("strategy.aggregator", "privacy.mode"),
        lambda c: c.privacy.mode == "off" and c.strategy.aggregator_traits.central_dp,
        lambda c: (
            f"{c.strategy.aggregator!r} is chosen by privacy.mode = 'central'; set that instead"
        ),
        name="DP aggregator without DP",
    ),
    Rule(
        ("privacy.delta",),
        lambda c: (
            c.privacy.mode != "off"
            and c.privacy.delta is None
            and known_clients(c)
            and c.partition.num_clients < 2
        ),
        "the default 1/N² is 1 with one client; set delta",
    ),
    Rule(
        ("privacy.mode", "federation.mode"),
        lambda c: c.privacy.mode != "off" and baseline(c),
        lambda c: f"applies to federation.mode = 'federated' only, not {c.federation.mode!r}",
    ),
    Rule(
        ("strategy.weighting", "privacy.mode"),
        lambda c: c.privacy.mode != "off" and c.strategy.weighting != "uniform",
        lambda c: (
            f"must be 'uniform' with privacy.mode = {c.privacy.mode!r}: the record counts "
            "n_k are each client's private data, and weighting by them changes what one client "
            "can move the mean by (the sensitivity the noise is calibrated to)"
        ),
    ),
    Rule(
        ("strategy.name", "privacy.mode"),
        lambda c: c.privacy.mode != "off" and c.strategy.client_state,
        lambda c: (
            f"{c.strategy.name} cannot be used with privacy.mode = {c.privacy.mode!r}: "
            "its per-client state (e.g. SCAFFOLD's control variates) is a second, unclipped and "
            "un-noised release of every client's gradients"
        ),
    ),
    Rule(
        ("federation.selection", "privacy.mode"),
        lambda c: c.privacy.mode == "central" and c.federation.selection != "uniform",
        (
            "must be 'uniform' with privacy.mode = 'central': the accountant's "
            "amplification by sampling assumes m of all N clients drawn uniformly"
        ),
    ),
    Rule(
        ("strategy.aggregator", "privacy.mode"),
        lambda c: (
            c.privacy.mode == "central"
            and c.strategy.aggregator_traits.needs_plain_updates
            and not c.strategy.aggregator_traits.central_dp
        ),
        lambda c: (
            "must be 'mean' with privacy.mode = 'central': central DP is its own "
            f"aggregator (the clipped, noised mean), not {c.strategy.aggregator!r}"
        ),
    ),
    Rule(
        ("strategy.lora_aggregation", "privacy.mode"),
        lambda c: c.privacy.mode == "central" and exact(c),
        (
            "must be 'separate' with privacy.mode = 'central': 'exact' folds a residual "
            "computed from the clients' un-noised adapters into the base weights"
        ),
    ),
    # Attacks need a federation to attack, and data to poison.
    Rule(
        ("attack.kind", "federation.mode"),
        lambda c: c.attack.kind != "none" and baseline(c),
        lambda c: (
            f"applies to federation.mode = 'federated' only, not {c.federation.mode!r} "
            "(fedit compare trains its baselines clean)"
        ),
    ),
    Rule(
        ("attack.kind", "train.objective"),
        lambda c: c.attack.kind in DATA_ATTACKS and c.train.objective == "dpo",
        lambda c: (
            f"{c.attack.kind!r} poisons instruction records, which train.objective = "
            "'dpo' does not train on"
        ),
    ),
    Rule(
        ("attack.clients", "partition.num_clients"),
        lambda c: known_clients(c) and any(k >= c.partition.num_clients for k in c.attack.clients),
        lambda c: f"ids must be < partition.num_clients ({c.partition.num_clients})",
    ),
)
