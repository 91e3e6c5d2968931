"""Every client's training data for a run, prepared and tokenised once.

Records and preference pairs go through the held-out split and the partitioner
(fedit.data.prepare), are tokenised once per client, and are then arranged for the run's
mode: all clients (federated), one client's (local), or all pooled in one (centralized).
The clients' tokenised records are kept on disk (fedit.data.token_store), so memory does
not grow with clients that are not training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fedit.attacks import malicious_clients
from fedit.attacks.data import client_records
from fedit.client.trainer import steps_per_round
from fedit.config import MAX_STEPS_PER_ROUND, ConfigError, RunConfig
from fedit.data.preferences import (
    PairTruncationReport,
    PreferencePair,
    TokenizedPair,
    tokenize_pairs,
)
from fedit.data.prepare import prepare_preferences, prepare_records
from fedit.data.records import DataFormatError, Record
from fedit.data.templates import render_conversation, render_prompt, response_frame
from fedit.data.token_store import StoredExamples, TokenStore, pooled
from fedit.data.tokenize import TokenizedExample, TruncationReport, tokenize_records
from fedit.fleet.selection import select_clients


@dataclass
class FederationData:
    """Every client's records and preference pairs, tokenised once for the whole run."""

    clients: list[StoredExamples]  # fedit.data.token_store: read when a client trains
    heldout: list[TokenizedExample]
    report: TruncationReport
    federated_sizes: list[int]  # records per client of the federated partition (not local)
    # DPO (data.preference_path): the same clients' pairs, held-out pairs, truncation counts
    pair_clients: list[list[TokenizedPair]] = field(default_factory=list)
    heldout_pairs: list[TokenizedPair] = field(default_factory=list)
    pair_report: PairTruncationReport | None = None
    federated_pair_sizes: list[int] = field(default_factory=list)
    # what max_seq_len left of the held-out set: a warning when it emptied a non-empty one
    heldout_warnings: list[str] = field(default_factory=list)
    heldout_records: list[Record] = field(default_factory=list)  # for generation scores
    skipped: list[str] = field(default_factory=list)  # data.on_bad_record = "skip": dropped

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
    # N is known now: ids beyond it are refused before anything is tokenised. An attack
    # implies federation.mode = "federated" (RunConfig), so k is the client's id.
    malicious = malicious_clients(cfg, len(prepared.parts))
    store = TokenStore()  # on disk: only the clients a round trains are read back
    for k, records in enumerate(_records_to_tokenize(cfg, prepared.train, prepared.parts)):
        records = client_records(cfg, k, records, malicious)
        examples, report = _tokenize(cfg, tokenizer, records)
        clients.append(store.add(examples))
        reports.append(report)
    heldout_examples, heldout_report = tokenize_heldout(cfg, tokenizer, prepared.heldout)
    local = cfg.federation.mode == "local"
    sizes = [] if local else [len(c) for c in clients]
    total = sum(reports, TruncationReport(0, 0, 0))
    if cfg.federation.mode == "centralized":  # _mode_clients's pooling, as a view
        clients, reports = [pooled(clients)], [total]
    if cfg.train.objective != "dpo":  # with dpo, records only give the held-out loss
        _check_not_empty(cfg, clients, reports, "records")
        _check_steps(cfg, sizes or [len(c) for c in clients])
    data = FederationData(clients, heldout_examples, total, sizes)
    data.heldout_records, data.skipped = prepared.heldout, prepared.skipped
    if not prepared.heldout:
        data.heldout_warnings.append(nothing_held_out(cfg))
    if prepared.heldout and not heldout_examples:
        data.heldout_warnings.append(
            f"held-out set: {dropped_reason(cfg, heldout_report, 'records')}; "
            "no held-out loss will be reported"
        )
    return data


def nothing_held_out(cfg: RunConfig) -> str:
    """Why no record is held out, and what it costs: every record trains."""
    return (
        f"no record is held out (data.heldout_per_category = {cfg.data.heldout_per_category}, "
        "no data.heldout_path): every record trains and no held-out loss will be reported; "
        "set either to measure the global model"
    )


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


def dropped_reason(
    cfg: RunConfig, report: TruncationReport | PairTruncationReport, what: str
) -> str:
    """Why no example is left of `report.total` items: data.max_seq_len dropped them all
    (a prompt that fills it leaves no response token to learn from), or there were none."""
    if not report.total:
        return f"no {what}"
    return (
        f"all {report.total} {what} dropped: prompt fills data.max_seq_len = "
        f"{cfg.data.max_seq_len} before any response token; raise data.max_seq_len"
    )


def _client_name(cfg: RunConfig, index: int) -> str:
    fed = cfg.federation
    if fed.mode == "centralized":
        return "the pooled (centralized) client"
    if fed.mode == "local" and fed.local_categories:
        return f"local categories {'+'.join(fed.local_categories)}"
    return f"client {fed.local_client if fed.mode == 'local' else index}"


def _check_not_empty(
    cfg: RunConfig,
    clients: list[list],
    reports: Sequence[TruncationReport | PairTruncationReport],
    what: str,
) -> None:
    """Every trained client needs an example: say which has none, and why."""
    empty = [i for i, c in enumerate(clients) if not c]
    if not empty:
        return
    first = empty[0]
    message = f"{_client_name(cfg, first)}: {dropped_reason(cfg, reports[first], what)}"
    if not reports[first].total:
        message += " (the partition gave it none; change the partition)"
    if len(empty) > 1:
        message += f" ({len(empty) - 1} more client(s) hold no trainable {what})"
    raise ConfigError(message)


def _check_steps(cfg: RunConfig, sizes: list[int]) -> None:
    """Refuse a round no client could finish: steps_per_round grows with local_epochs."""
    steps = max((steps_per_round(n, cfg.train) for n in sizes), default=0)
    if steps > MAX_STEPS_PER_ROUND:
        raise ConfigError(
            f"train.local_epochs: {cfg.train.local_epochs:g} epochs of {max(sizes)} records "
            f"at batch size {cfg.train.batch_size} is {steps} optimizer steps per round, "
            f"more than {MAX_STEPS_PER_ROUND}; lower it or set train.max_steps"
        )


def _prepare_pairs(cfg: RunConfig, tokenizer, data: FederationData) -> None:
    """Preference pairs → held-out split → partition → tokenised, into `data`."""
    prepared = prepare_preferences(cfg)
    clients, reports = [], []
    for items in _records_to_tokenize(cfg, prepared.train, prepared.parts):
        pairs, part_report = tokenize_pairs_for(cfg, tokenizer, items)
        clients.append(pairs)
        reports.append(part_report)
    data.heldout_pairs, heldout_report = tokenize_pairs_for(cfg, tokenizer, prepared.heldout)
    local = cfg.federation.mode == "local"
    data.federated_pair_sizes = [] if local else [len(c) for c in clients]
    data.pair_clients = clients if local else _mode_clients(cfg, clients)
    data.pair_report = sum(reports, PairTruncationReport())
    if cfg.federation.mode == "centralized":
        reports = [data.pair_report]
    if cfg.train.objective != "sft":  # with sft, pairs only give held-out preference scores
        _check_not_empty(cfg, data.pair_clients, reports, "preference pairs")
        _check_steps(cfg, data.federated_pair_sizes or [len(c) for c in data.pair_clients])
    if prepared.heldout and not data.heldout_pairs:
        data.heldout_warnings.append(
            f"held-out pairs: {dropped_reason(cfg, heldout_report, 'preference pairs')}; "
            "no held-out preference scores will be reported"
        )


def tokenize_pairs_for(
    cfg: RunConfig, tokenizer, pairs: Sequence[PreferencePair]
) -> tuple[list[TokenizedPair], PairTruncationReport]:
    """Prompts rendered with data.template (as SFT prompts are), then length-limited: a
    conversation (``pair.turns``) with the chat template, every turn in its role."""
    template, system_prompt = cfg.data.template, cfg.data.system_prompt

    def render(pair: PreferencePair) -> str:
        if template == "chat" and pair.turns:
            return render_conversation(pair.messages(), template, tokenizer, system_prompt)
        if not pair.prompt:
            raise DataFormatError(
                f"data.template = {template!r} renders one user turn, but a preference pair's "
                f"prompt is a conversation (a system turn or earlier turns, ending "
                f"{pair.turns[-1][1][:40]!r}); set data.template = 'chat'"
            )
        return render_prompt(Record(pair.prompt, ""), template, tokenizer, system_prompt)

    frame = response_frame(template, tokenizer)
    limits = (cfg.dpo.max_prompt_len, cfg.data.max_seq_len)
    return tokenize_pairs(pairs, tokenizer, *limits, render, frame)


def _tokenize(
    cfg: RunConfig, tokenizer, records, train_on_prompt: bool | None = None
) -> tuple[list[TokenizedExample], TruncationReport]:
    data = cfg.data
    return tokenize_records(
        records,
        tokenizer,
        data.template,
        data.max_seq_len,
        data.train_on_prompt if train_on_prompt is None else train_on_prompt,
        system_prompt=data.system_prompt,
        turns=data.train_on_turns,
    )


def tokenize_heldout(
    cfg: RunConfig, tokenizer, records
) -> tuple[list[TokenizedExample], TruncationReport]:
    """Records as every held-out loss scores them (the run's rounds, `fedit compare`,
    `fedit eval`): the run's template and max_seq_len, loss on response tokens only, whatever
    data.train_on_prompt says for training."""
    return _tokenize(cfg, tokenizer, records, train_on_prompt=False)


def scoring_examples(cfg: RunConfig, tokenizer, records, what: str) -> list[TokenizedExample]:
    """``tokenize_heldout``, refused with the reason when no record is left to score
    (`what` names the set in the message)."""
    examples, report = tokenize_heldout(cfg, tokenizer, records)
    if not examples:
        raise ConfigError(f"{what}: {dropped_reason(cfg, report, 'records')}")
    return examples


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


def tokenize_owner_data(
    cfg: RunConfig,
    tokenizer,
    records: Sequence[Record],
    pairs: Sequence[PreferencePair],
    client_id: int,
) -> tuple[list[TokenizedExample], list[TokenizedPair]]:
    """Data owner ``client_id``'s records and pairs, tokenised as the simulation tokenises a
    client's (a deployment's owner holds just its own; a data attack poisons them the same
    way), refused with the reason when the round's objective would find nothing to train
    on."""
    malicious = malicious_clients(cfg, cfg.partition.num_clients)  # N: the roster's size
    records = client_records(cfg, client_id, records, malicious)
    examples, report = _tokenize(cfg, tokenizer, records)
    tokenized_pairs, pair_report = tokenize_pairs_for(cfg, tokenizer, pairs)
    objective = cfg.train.objective
    if objective != "dpo":
        _check_not_empty(cfg, [examples], [report], "records")
        _check_steps(cfg, [len(examples)])
    if objective != "sft":
        _check_not_empty(cfg, [tokenized_pairs], [pair_report], "preference pairs")
        _check_steps(cfg, [len(tokenized_pairs)])
    return examples, tokenized_pairs
