"""Every client's training data for a run, prepared and tokenised once.

Records and preference pairs go through the held-out split and the partitioner
(fedit.data.prepare), are tokenised once per client, and are then arranged for the run's
mode: all clients (federated), one client's (local), or all pooled in one (centralized).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fedit.client.trainer import steps_per_round
from fedit.config import ConfigError, RunConfig
from fedit.data.preferences import (
    PairTruncationReport,
    PreferencePair,
    TokenizedPair,
    tokenize_pairs,
)
from fedit.data.prepare import prepare_preferences, prepare_records
from fedit.data.records import Record
from fedit.data.templates import render_prompt
from fedit.data.tokenize import TokenizedExample, TruncationReport, tokenize_records
from fedit.server.selection import select_clients


@dataclass
class FederationData:
    """Every client's records and preference pairs, tokenised once for the whole run."""

    clients: list[list[TokenizedExample]]
    heldout: list[TokenizedExample]
    report: TruncationReport
    federated_sizes: list[int]  # records per client of the federated partition (not local)
    # DPO (data.preference_path): the same clients' pairs, held-out pairs, truncation counts
    pair_clients: list[list[TokenizedPair]] = field(default_factory=list)
    heldout_pairs: list[TokenizedPair] = field(default_factory=list)
    pair_report: PairTruncationReport | None = None
    federated_pair_sizes: list[int] = field(default_factory=list)

    @property
    def num_clients(self) -> int:
        return len(self.clients or self.pair_clients)


def round_objective(cfg: RunConfig, round_index: int) -> str:
    """What round `round_index` (0-based) trains: "sft" or "dpo"."""
    objective = cfg.train.objective
    if objective == "sft_then_dpo":
        return "sft" if round_index < cfg.dpo.sft_rounds else "dpo"
    return objective


def prepare_data(cfg: RunConfig, tokenizer) -> FederationData:
    """Records and preference pairs → held-out split → partition → tokenised once per client.

    Either may be absent (data.path / data.preference_path unset). Baseline modes reuse the
    federated partition so their clients are the same people.
    """
    data = FederationData([], [], TruncationReport(0, 0, 0), [])
    if cfg.data.path:
        data = _prepare_records(cfg, tokenizer)
    if cfg.data.preference_path:
        _prepare_pairs(cfg, tokenizer, data)
    return data


def _prepare_records(cfg: RunConfig, tokenizer) -> FederationData:
    prepared = prepare_records(cfg)
    reports: list[TruncationReport] = []
    clients = []
    for records in _records_to_tokenize(cfg, prepared.train, prepared.parts):
        examples, report = _tokenize(cfg, tokenizer, records)
        clients.append(examples)
        reports.append(report)
    heldout_examples, _ = _tokenize(cfg, tokenizer, prepared.heldout)
    local = cfg.federation.mode == "local"
    sizes = [] if local else [len(c) for c in clients]
    if not local:
        clients = _mode_clients(cfg, clients)
    if cfg.train.objective != "dpo":  # with dpo, records only give the held-out loss
        _check_not_empty(clients, "trainable records")
    total = TruncationReport(
        total=sum(r.total for r in reports),
        truncated=sum(r.truncated for r in reports),
        dropped=sum(r.dropped for r in reports),
    )
    return FederationData(clients, heldout_examples, total, sizes)


def _records_to_tokenize(cfg: RunConfig, train: list, parts: list[list[int]]) -> list[list]:
    """Per client, the items to tokenise: a local run needs only its own client's (or
    categories') items; federated and centralized runs need every client's, whose sizes
    set the centralized budget."""
    per_client = [[train[i] for i in part] for part in parts]
    return _mode_clients(cfg, per_client) if cfg.federation.mode == "local" else per_client


def _mode_clients(cfg: RunConfig, clients: list[list]) -> list[list]:
    """The clients a mode trains: all (federated), one, or one pooled client."""
    fed = cfg.federation
    if fed.mode == "local" and fed.local_categories:
        wanted = set(fed.local_categories)
        return [[e for client in clients for e in client if e.category in wanted]]
    if fed.mode == "local":
        return [clients[fed.local_client]]
    if fed.mode == "centralized":
        return [[e for client in clients for e in client]]
    return clients


def _check_not_empty(clients: list[list], what: str) -> None:
    empty = [i for i, c in enumerate(clients) if not c]
    if empty:
        raise ConfigError(f"clients {empty[:5]} hold no {what}; change the partition")


def _prepare_pairs(cfg: RunConfig, tokenizer, data: FederationData) -> None:
    """Preference pairs → held-out split → partition → tokenised, into `data`."""
    prepared = prepare_preferences(cfg)
    clients, report = [], PairTruncationReport()
    for items in _records_to_tokenize(cfg, prepared.train, prepared.parts):
        pairs, part_report = tokenize_pairs_for(cfg, tokenizer, items)
        clients.append(pairs)
        report += part_report
    data.heldout_pairs, _ = tokenize_pairs_for(cfg, tokenizer, prepared.heldout)
    local = cfg.federation.mode == "local"
    data.federated_pair_sizes = [] if local else [len(c) for c in clients]
    data.pair_clients = clients if local else _mode_clients(cfg, clients)
    data.pair_report = report
    if cfg.train.objective != "sft":  # with sft, pairs only give held-out preference scores
        _check_not_empty(data.pair_clients, "preference pairs")


def tokenize_pairs_for(
    cfg: RunConfig, tokenizer, pairs: Sequence[PreferencePair]
) -> tuple[list[TokenizedPair], PairTruncationReport]:
    """Prompts rendered with data.template (as SFT prompts are), then length-limited."""
    template = cfg.data.template

    def render(prompt: str) -> str:
        return render_prompt(
            Record(instruction=prompt, response=""), template, tokenizer, cfg.data.system_prompt
        )

    return tokenize_pairs(pairs, tokenizer, cfg.dpo.max_prompt_len, cfg.data.max_seq_len, render)


def _tokenize(
    cfg: RunConfig, tokenizer, records
) -> tuple[list[TokenizedExample], TruncationReport]:
    data = cfg.data
    return tokenize_records(
        records,
        tokenizer,
        data.template,
        data.max_seq_len,
        data.train_on_prompt,
        system_prompt=data.system_prompt,
    )


def centralized_steps(
    cfg: RunConfig, client_sizes: list[int], rounds: Sequence[int] | None = None
) -> int:
    """Steps per round for the pooled baseline: the federated run's mean total per round.

    `rounds` (default: all) limits the mean to some rounds, e.g. the DPO rounds of
    sft_then_dpo, whose sizes are the clients' pair counts.
    """
    fed = cfg.federation
    rounds = range(fed.rounds) if rounds is None else rounds
    total = 0
    for r in rounds:
        chosen = select_clients(len(client_sizes), fed.clients_per_round, fed.fraction, cfg.seed, r)
        total += sum(steps_per_round(client_sizes[k], cfg.train) for k in chosen)
    return max(1, round(total / len(rounds)))
