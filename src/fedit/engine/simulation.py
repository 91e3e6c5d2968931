"""In-process simulation engine: many clients, one base model in memory.

A round reads top to bottom: select clients → for each, load the global adapter into the
shared model and run the local trainer on its pre-tokenised records → the strategy
aggregates the updates → evaluate → checkpoint → one metrics line. Client training
(fedit.client) and server strategies (fedit.server) know nothing of this engine, so a
networked engine reuses them unchanged.

The baselines of the FedIT paper are modes of the same engine:
- local: one client's records, selected every round (the optimizer steps it would have
  had over the run had it been sampled every round);
- centralized: all clients' records pooled in one client, with as many optimizer steps
  per round as the federated run's sampled clients take together, so both see the same
  number of training records.

The objective is chosen per round (``train.objective``): SFT rounds run
``fedit.client.trainer.train_client`` on the clients' records, DPO rounds
``fedit.client.dpo_trainer.train_client_dpo`` on their preference pairs, and
``sft_then_dpo`` switches after ``dpo.sft_rounds``. Strategies see adapters only, so every
one of them serves both. Held-out preference accuracy and margin (reward
β·(log π − log π_ref), π_ref the base model) are reported beside the held-out loss.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from tqdm.auto import tqdm

from fedit.client.dpo import preference_scores
from fedit.client.dpo_trainer import pair_logps, train_client_dpo
from fedit.client.trainer import round_learning_rate, steps_per_round, train_client
from fedit.config import ConfigError, RunConfig, TrainConfig
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
from fedit.engine.checkpoint import (
    Checkpoint,
    completed_rounds,
    load_checkpoint,
    round_dir,
    save_checkpoint,
)
from fedit.eval.loss import heldout_loss
from fedit.models.adapters import (
    add_to_base_weights,
    attach_lora,
    get_adapter_state,
    lora_scaling,
    set_adapter_state,
)
from fedit.models.loading import load_model, load_tokenizer
from fedit.seeding import derive_seed
from fedit.server.selection import select_clients
from fedit.server.strategies import build_strategy
from fedit.types import ClientUpdate

console = Console(stderr=True)


@dataclass
class FederationData:
    """Every client's records and preference pairs, tokenised once for the whole run."""

    clients: list[list[TokenizedExample]]
    heldout: list[TokenizedExample]
    report: TruncationReport
    federated_sizes: list[int]  # records per client of the federated partition
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
    train, parts = prepared.train, prepared.parts
    reports: list[TruncationReport] = []
    clients = []
    for part in parts:
        examples, report = _tokenize(cfg, tokenizer, [train[i] for i in part])
        clients.append(examples)
        reports.append(report)
    heldout_examples, _ = _tokenize(cfg, tokenizer, prepared.heldout)
    sizes = [len(c) for c in clients]
    clients = _mode_clients(cfg, clients)
    if cfg.train.objective != "dpo":  # with dpo, records only give the held-out loss
        _check_not_empty(clients, "trainable records")
    total = TruncationReport(
        total=sum(r.total for r in reports),
        truncated=sum(r.truncated for r in reports),
        dropped=sum(r.dropped for r in reports),
    )
    return FederationData(clients, heldout_examples, total, sizes)


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
    for part in prepared.parts:
        pairs, part_report = _tokenize_pairs(cfg, tokenizer, [prepared.train[i] for i in part])
        clients.append(pairs)
        report += part_report
    data.heldout_pairs, _ = _tokenize_pairs(cfg, tokenizer, prepared.heldout)
    data.federated_pair_sizes = [len(c) for c in clients]
    data.pair_clients = _mode_clients(cfg, clients)
    data.pair_report = report
    if cfg.train.objective != "sft":  # with sft, pairs only give held-out preference scores
        _check_not_empty(data.pair_clients, "preference pairs")


def _tokenize_pairs(
    cfg: RunConfig, tokenizer, pairs: Sequence[PreferencePair]
) -> tuple[list[TokenizedPair], PairTruncationReport]:
    """Prompts rendered with data.template (as SFT prompts are), then length-limited."""
    template = cfg.data.template

    def render(prompt: str) -> str:
        return render_prompt(Record(instruction=prompt, response=""), template, tokenizer)

    return tokenize_pairs(pairs, tokenizer, cfg.dpo.max_prompt_len, cfg.data.max_seq_len, render)


def _tokenize(
    cfg: RunConfig, tokenizer, records
) -> tuple[list[TokenizedExample], TruncationReport]:
    data = cfg.data
    return tokenize_records(
        records, tokenizer, data.template, data.max_seq_len, data.train_on_prompt
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


class Simulation:
    """Runs one configured federation (or baseline) in this process."""

    def __init__(self, cfg: RunConfig, show_progress: bool = True) -> None:
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.show_progress = show_progress
        self.heldout_reference: torch.Tensor | None = None  # base log-probs of held-out pairs

    def run(self, resume: bool = False) -> Path:
        """Train all rounds (continuing after the last checkpoint with `resume`)."""
        cfg = self.cfg
        done = completed_rounds(self.output_dir)
        if done and not resume:
            raise ConfigError(
                f"{self.output_dir} already holds rounds up to {done[-1]}: "
                "pass --resume to continue it, or choose another output_dir"
            )
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(self.output_dir / "config.toml")
        tokenizer = load_tokenizer(cfg.model)
        self.pad_id = tokenizer.pad_token_id
        data = prepare_data(cfg, tokenizer)
        self._describe(data)
        train_cfgs = self._train_configs(data)
        model = attach_lora(load_model(cfg.model), cfg.lora, cfg.seed)
        strategy = build_strategy(cfg.strategy, data.num_clients)
        strategy.lora_scaling = lora_scaling(cfg.lora)
        strategy.set_storage_dir(self.output_dir / "client_state")
        # Before _restore folds any exact-aggregation residual into the base: π_ref = W0.
        self.heldout_reference = self._base_logps(model, data.heldout_pairs)
        start, global_state, residual = self._restore(model, strategy, done)
        self._trim_metrics(start)
        if start == 0 and cfg.eval.at_start:
            self._write_metrics({"round": 0, **self._evaluate(model, data)})
        rounds = range(start, cfg.federation.rounds)
        for r in tqdm(
            rounds,
            desc="rounds",
            initial=start,
            total=cfg.federation.rounds,
            disable=not self.show_progress,
        ):
            global_state, residual = self._round(
                r, model, strategy, data, train_cfgs, global_state, residual
            )
        final = round_dir(self.output_dir, cfg.federation.rounds)
        console.print(
            f"[bold green]done[/]: global adapter in {final}, metrics in "
            f"{self.output_dir / 'metrics.jsonl'}"
        )
        return final

    def _describe(self, data: FederationData) -> None:
        cfg = self.cfg
        text = f"[bold]fedit[/] {cfg.federation.mode}: {data.num_clients} client(s)"
        if cfg.data.path:
            text += (
                f", {sum(map(len, data.clients))} training records, {len(data.heldout)} held "
                f"out; {data.report.summary()}"
            )
        if data.pair_report is not None:
            text += (
                f"; {sum(map(len, data.pair_clients))} training pairs, "
                f"{len(data.heldout_pairs)} held out; {data.pair_report.summary()}"
            )
        console.print(text)

    def _train_configs(self, data: FederationData) -> dict[str, TrainConfig]:
        """The train config of each objective; centralized runs match the federated budget."""
        cfg = self.cfg
        if cfg.federation.mode != "centralized":
            return {"sft": cfg.train, "dpo": cfg.train}
        configs = {}
        for objective, sizes in (
            ("sft", data.federated_sizes),
            ("dpo", data.federated_pair_sizes),
        ):
            rounds = [
                r for r in range(cfg.federation.rounds) if round_objective(cfg, r) == objective
            ]
            if rounds:
                steps = centralized_steps(cfg, sizes, rounds)
                configs[objective] = replace(cfg.train, max_steps=steps)
        return configs

    def _restore(self, model, strategy, done: list[int]):
        if not done:
            return 0, get_adapter_state(model), {}
        last = done[-1]
        checkpoint = load_checkpoint(model, round_dir(self.output_dir, last), last)
        strategy.load_state_dict(checkpoint.server_state)
        add_to_base_weights(model, checkpoint.base_residual)
        console.print(f"resuming after round {last}")
        return last, checkpoint.global_state, checkpoint.base_residual

    def _trim_metrics(self, start: int) -> None:
        """Drop metric lines of rounds after the last checkpoint (a crash between them)."""
        path = self.output_dir / "metrics.jsonl"
        if not path.exists():
            return
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln)["round"] <= start]
        path.write_text("".join(ln + "\n" for ln in kept))

    def _round(self, r, model, strategy, data, train_cfgs, global_state, residual):
        cfg, fed = self.cfg, self.cfg.federation
        started = time.perf_counter()
        chosen = select_clients(data.num_clients, fed.clients_per_round, fed.fraction, cfg.seed, r)
        if fed.mode != "federated":
            chosen = [0]
        objective = round_objective(cfg, r)
        train_cfg = train_cfgs[objective]
        lr = round_learning_rate(train_cfg, r, fed.rounds)
        updates = []
        for k in chosen:
            set_adapter_state(model, global_state)
            update = self._train_client(
                objective,
                model,
                data,
                k,
                train_cfg,
                learning_rate=lr,
                seed=derive_seed(cfg.seed, r, k),
                pad_id=self.pad_id,
                hook=strategy.client_hook(k, global_state),
                show_progress=self.show_progress,
            )
            updates.append(update)
        global_state = strategy.aggregate(global_state, updates, r)
        new_residual = strategy.take_base_residual()
        if new_residual:
            add_to_base_weights(model, new_residual)
            residual = {k: residual.get(k, 0) + v for k, v in new_residual.items()}
        set_adapter_state(model, global_state)
        record: dict[str, Any] = {
            "round": r + 1,
            "objective": objective,
            "learning_rate": lr,
            "clients": [
                {"id": u.client_id, "num_examples": u.num_examples, **u.metrics} for u in updates
            ],
            "strategy": strategy.metrics(),
        }
        last = r + 1 == fed.rounds
        if last or (r + 1) % cfg.eval.every_rounds == 0:
            record.update(self._evaluate(model, data))
        record["seconds"] = time.perf_counter() - started
        checkpoint = Checkpoint(
            round_number=r + 1,
            global_state=global_state,
            server_state=strategy.state_dict(),
            base_residual=residual,
            run_state={"round": r + 1, "seed": cfg.seed, "strategy": cfg.strategy.name},
        )
        save_checkpoint(self.output_dir, model, checkpoint, cfg)
        self._write_metrics(record)
        return global_state, residual

    def _train_client(
        self, objective: str, model, data: FederationData, k: int, train_cfg, **kwargs: Any
    ) -> ClientUpdate:
        """Client k's local round on the round's objective: its records or its pairs."""
        if objective == "dpo":
            pairs = data.pair_clients[k]
            return train_client_dpo(model, pairs, train_cfg, self.cfg.dpo, client_id=k, **kwargs)
        return train_client(model, data.clients[k], train_cfg, client_id=k, **kwargs)

    def _evaluate(self, model, data: FederationData) -> dict[str, Any]:
        """Held-out loss and preference scores per category, and how long they took (kept
        apart from training)."""
        if not data.heldout and not data.heldout_pairs:
            return {}
        started = time.perf_counter()
        record: dict[str, Any] = {}
        if data.heldout:
            batch_size = self.cfg.eval.batch_size
            record["heldout"] = heldout_loss(model, data.heldout, self.pad_id, batch_size)
        if data.heldout_pairs:
            policy = self._logps(model, data.heldout_pairs)
            categories = [p.category for p in data.heldout_pairs]
            record["heldout_dpo"] = preference_scores(
                policy, self.heldout_reference, categories, self.cfg.dpo.beta
            )
        record["eval_seconds"] = time.perf_counter() - started
        return record

    def _logps(self, model, pairs: list[TokenizedPair]) -> torch.Tensor:
        """(N, 2) log-probs of held-out pairs in full precision, as heldout_loss computes."""
        return pair_logps(model, pairs, self.pad_id, batch_size=self.cfg.eval.batch_size)

    def _base_logps(self, model, pairs: list[TokenizedPair]) -> torch.Tensor | None:
        if not pairs:
            return None
        with model.disable_adapter():
            return self._logps(model, pairs)

    def _write_metrics(self, record: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl (after the round's checkpoint) and report it."""
        with (self.output_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        text = f"round {record['round']}:"
        if record.get("clients"):
            losses = [c["train_loss"] for c in record["clients"]]
            name = "dpo loss" if record.get("objective") == "dpo" else "train loss"
            text += f" {name} {sum(losses) / len(losses):.4f}"
        if "heldout" in record:
            text += f" held-out loss {record['heldout']['overall']['loss']:.4f}"
        if "heldout_dpo" in record:
            overall = record["heldout_dpo"]["overall"]
            text += (
                f" held-out preference accuracy {overall['accuracy']:.3f}"
                f" margin {overall['margin']:.4f}"
            )
        console.print(text + (f" ({record['seconds']:.1f}s)" if "seconds" in record else ""))
