"""Personalised adapters after federation: each client's own, fine-tuned from the global
adapter on its own records, scored on its own distribution beside the global adapter and a
local-only adapter (`fedit personalize`).

For client k with training records in categories c at shares m_kc, its own score is
Σ_c m_kc · L_c, with L_c the token-weighted held-out loss of category c. The held-out set
is the coordinator's, by category, so a client's own held-out records are those of its
categories, in its proportions. Three adapters per client:
- global: the federation's final adapter;
- personalised: the global adapter after `steps` more optimizer steps on k's records
  (local fine-tuning, the simplest personalisation; Wang et al. 2019, "Federated
  Evaluation of On-device Personalization"). Under FedSA-LoRA (lora.shared = "A",
  fedit.ops.sharing) it starts from the client's own adapter made during federation,
  (Ā, B_k) with B_k kept on its disk as of its last accepted round, and `steps` may be 0:
  that adapter as the federation left it. There the global adapter is the base model;
- local-only: a fresh LoRA trained on k's records alone for the steps the `local`
  baseline of `fedit compare` would give it (its steps per round × rounds).
Each personalised adapter is saved (PEFT format) under <output_dir>/personalized/client_<k>/,
with the run's config.toml beside it (its prompt format, which `fedit serve` reads).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from fedit.client.hooks import make_hook
from fedit.client.own_factors import OWN_FACTORS_DIR, own_factors
from fedit.client.trainer import round_learning_rate, steps_per_round, train_client
from fedit.config import ConfigError, RunConfig, rules
from fedit.data.tokenize import TokenizedExample
from fedit.engine.assembly import assemble
from fedit.engine.checkpoint import (
    accepted_rounds,
    committed_records,
    completed_rounds,
    load_global_adapter,
    round_dir,
)
from fedit.engine.federation_data import prepare_data
from fedit.engine.run_dir import CONFIG
from fedit.eval.loss import heldout_loss
from fedit.models.adapters import get_adapter_state, save_adapter, set_adapter_state
from fedit.seeding import Stream, derive_seed
from fedit.types import AdapterState, ClientInstructions

PERSONALIZED_DIR = "personalized"
SCORES_FILE = "personalized.json"


@dataclass(frozen=True)
class ClientScores:
    """Client k's own held-out loss under each of its three adapters."""

    client: int
    personalised: float
    global_adapter: float
    local_only: float


def category_mix(examples: list[TokenizedExample]) -> dict[str, float]:
    """m_kc: the share of a client's training records in each category."""
    counts = Counter(e.category for e in examples)
    return {c: n / len(examples) for c, n in counts.items()}


def own_loss(
    model: torch.nn.Module,
    heldout: list[TokenizedExample],
    mix: dict[str, float],
    pad_id: int,
    batch_size: int,
) -> float:
    """Σ_c m_kc · L_c over the categories of `mix` that the held-out set has."""
    mine = [e for e in heldout if e.category in mix]
    if not mine:
        raise ConfigError(f"no held-out records in the client's categories {sorted(mix)}")
    losses = heldout_loss(model, mine, pad_id, batch_size)
    covered = {c: m for c, m in mix.items() if c in losses}
    total = sum(covered.values())
    return sum(m * losses[c]["loss"] for c, m in covered.items()) / total


def personalize(cfg: RunConfig, steps: int, show_progress: bool = False) -> list[ClientScores]:
    """Every client's three scores (see the module docstring), its adapter saved."""
    rules.check(cfg, "personalize")
    out = Path(cfg.output_dir)
    done = completed_rounds(out)
    if not done or done[-1] != cfg.federation.rounds:
        raise ConfigError(
            f"{out}: the federation has not finished its {cfg.federation.rounds} rounds "
            "(run `fedit train` first)"
        )
    parts = assemble(cfg, prepare_data)
    data, model = parts.data, parts.model
    fresh = get_adapter_state(model)
    global_state = load_global_adapter(model, round_dir(out, cfg.federation.rounds))
    own_root = out / OWN_FACTORS_DIR
    accepted = accepted_rounds(committed_records(out, done))
    pad_id, batch = parts.pad_id, cfg.eval.batch_size
    scores = []
    for k, examples in enumerate(data.clients):
        if not examples:
            continue
        mix = category_mix(examples)
        set_adapter_state(model, global_state)
        global_loss = own_loss(model, data.heldout, mix, pad_id, batch)
        tune = FineTune(cfg, k, examples, pad_id, show_progress)
        start = own_adapter(cfg, k, own_root, accepted.get(k, 0), global_state)
        own_dir = out / PERSONALIZED_DIR / f"client_{k}"
        save_adapter(model, tune(model, start, steps), own_dir)
        cfg.save(own_dir / CONFIG)  # self-describing: its prompt format, for `fedit serve`
        personal_loss = own_loss(model, data.heldout, mix, pad_id, batch)
        tune(model, fresh, steps_per_round(len(examples), cfg.train) * cfg.federation.rounds)
        local_loss = own_loss(model, data.heldout, mix, pad_id, batch)
        scores.append(ClientScores(k, personal_loss, global_loss, local_loss))
    (out / SCORES_FILE).write_text(json.dumps([asdict(s) for s in scores], indent=2))
    return scores


@dataclass(frozen=True)
class FineTune:
    """Client k's local training from a given adapter, as in its rounds (the run's
    [train], the last round's learning rate, no hook), seeded by (client, steps)."""

    cfg: RunConfig
    client_id: int
    examples: Sequence[TokenizedExample]  # stored examples: train_client reads them once
    pad_id: int
    show_progress: bool

    def __call__(self, model: torch.nn.Module, start: AdapterState, steps: int) -> AdapterState:
        """Train `steps` steps from `start` (0: `start` itself); the model holds the
        result, also returned."""
        cfg, rounds = self.cfg, self.cfg.federation.rounds
        set_adapter_state(model, start)
        if steps == 0:
            return start
        return train_client(
            model,
            self.examples,
            replace(cfg.train, max_steps=steps),
            client_id=self.client_id,
            learning_rate=round_learning_rate(cfg.train, rounds - 1, rounds),
            seed=derive_seed(cfg.seed, Stream.PERSONALIZE, self.client_id, steps),
            pad_id=self.pad_id,
            hook=make_hook(ClientInstructions()),
            show_progress=self.show_progress,
        ).state


def own_adapter(
    cfg: RunConfig, client_id: int, root: Path, round_number: int, global_state: AdapterState
) -> AdapterState:
    """Where client `client_id`'s personalisation starts: the global adapter, or under
    FedSA-LoRA (Ā, B_k) with its B_k of `round_number` (its last accepted round), which
    must be on this disk (a deployed owner keeps it on its own)."""
    own = own_factors(cfg, client_id, root)
    if own is None:
        return global_state
    if not own.store.has(round_number):
        raise ConfigError(
            f"{own.store.directory}: no kept B factors of round {round_number}; under "
            "lora.shared = 'A' they are on each client's disk (a deployment's owners keep "
            "theirs in their state directory), and personalize reads a simulation's"
        )
    return own.load(round_number, global_state)


def report(scores: list[ClientScores]) -> str:
    """A markdown table: per client, then the mean over clients and the worst client."""
    rows = [
        "| client | personalised | global | local-only |",
        "|---|---:|---:|---:|",
    ]
    for s in scores:
        rows.append(
            f"| {s.client} | {s.personalised:.4f} | {s.global_adapter:.4f} | {s.local_only:.4f} |"
        )
    columns = [[s.personalised for s in scores], [s.global_adapter for s in scores]]
    columns.append([s.local_only for s in scores])
    means = " | ".join(f"{sum(c) / len(c):.4f}" for c in columns)
    worst = " | ".join(f"{max(c):.4f}" for c in columns)
    rows += [f"| mean | {means} |", f"| worst | {worst} |"]
    return "\n".join(rows) + "\n"
