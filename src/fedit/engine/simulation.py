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
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from tqdm.auto import tqdm

from fedit.client.trainer import round_learning_rate, steps_per_round, train_client
from fedit.config import ConfigError, RunConfig, TrainConfig
from fedit.data.prepare import prepare_records
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

console = Console(stderr=True)


@dataclass
class FederationData:
    """Every client's records, tokenised once for the whole run."""

    clients: list[list[TokenizedExample]]
    heldout: list[TokenizedExample]
    report: TruncationReport
    federated_sizes: list[int]  # records per client of the federated partition


def prepare_data(cfg: RunConfig, tokenizer) -> FederationData:
    """Records → held-out split → partition → tokenised once per client.

    Baseline modes reuse the federated partition so their clients are the same people.
    """
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
    fed = cfg.federation
    if fed.mode == "local" and fed.local_categories:
        wanted = set(fed.local_categories)
        clients = [[e for client in clients for e in client if e.category in wanted]]
    elif fed.mode == "local":
        clients = [clients[fed.local_client]]
    elif cfg.federation.mode == "centralized":
        clients = [[e for client in clients for e in client]]
    empty = [i for i, c in enumerate(clients) if not c]
    if empty:
        raise ConfigError(f"clients {empty[:5]} hold no trainable records; change the partition")
    total = TruncationReport(
        total=sum(r.total for r in reports),
        truncated=sum(r.truncated for r in reports),
        dropped=sum(r.dropped for r in reports),
    )
    return FederationData(clients, heldout_examples, total, sizes)


def _tokenize(
    cfg: RunConfig, tokenizer, records
) -> tuple[list[TokenizedExample], TruncationReport]:
    data = cfg.data
    return tokenize_records(
        records, tokenizer, data.template, data.max_seq_len, data.train_on_prompt
    )


def centralized_steps(cfg: RunConfig, client_sizes: list[int]) -> int:
    """Steps per round for the pooled baseline: the federated run's mean total per round."""
    fed = cfg.federation
    total = 0
    for r in range(fed.rounds):
        chosen = select_clients(len(client_sizes), fed.clients_per_round, fed.fraction, cfg.seed, r)
        total += sum(steps_per_round(client_sizes[k], cfg.train) for k in chosen)
    return max(1, round(total / fed.rounds))


class Simulation:
    """Runs one configured federation (or baseline) in this process."""

    def __init__(self, cfg: RunConfig, show_progress: bool = True) -> None:
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.show_progress = show_progress

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
        console.print(
            f"[bold]fedit[/] {cfg.federation.mode}: {len(data.clients)} client(s), "
            f"{sum(map(len, data.clients))} training records, {len(data.heldout)} held out; "
            f"{data.report.summary()}"
        )
        train_cfg = self._train_config(data)
        model = attach_lora(load_model(cfg.model), cfg.lora, cfg.seed)
        strategy = build_strategy(cfg.strategy, len(data.clients))
        strategy.lora_scaling = lora_scaling(cfg.lora)
        strategy.set_storage_dir(self.output_dir / "client_state")
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
                r, model, strategy, data, train_cfg, global_state, residual
            )
        final = round_dir(self.output_dir, cfg.federation.rounds)
        console.print(
            f"[bold green]done[/]: global adapter in {final}, metrics in "
            f"{self.output_dir / 'metrics.jsonl'}"
        )
        return final

    def _train_config(self, data: FederationData) -> TrainConfig:
        if self.cfg.federation.mode != "centralized":
            return self.cfg.train
        steps = centralized_steps(self.cfg, data.federated_sizes)
        return replace(self.cfg.train, max_steps=steps)

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

    def _round(self, r, model, strategy, data, train_cfg, global_state, residual):
        cfg, fed = self.cfg, self.cfg.federation
        started = time.perf_counter()
        chosen = select_clients(len(data.clients), fed.clients_per_round, fed.fraction, cfg.seed, r)
        if fed.mode != "federated":
            chosen = [0]
        lr = round_learning_rate(train_cfg, r, fed.rounds)
        updates = []
        for k in chosen:
            set_adapter_state(model, global_state)
            updates.append(
                train_client(
                    model,
                    data.clients[k],
                    train_cfg,
                    client_id=k,
                    learning_rate=lr,
                    seed=derive_seed(cfg.seed, r, k),
                    pad_id=self.pad_id,
                    hook=strategy.client_hook(k, global_state),
                    show_progress=self.show_progress,
                )
            )
        global_state = strategy.aggregate(global_state, updates, r)
        new_residual = strategy.take_base_residual()
        if new_residual:
            add_to_base_weights(model, new_residual)
            residual = {k: residual.get(k, 0) + v for k, v in new_residual.items()}
        set_adapter_state(model, global_state)
        record: dict[str, Any] = {
            "round": r + 1,
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

    def _evaluate(self, model, data: FederationData) -> dict[str, Any]:
        """Held-out loss per category, and how long it took (kept apart from training)."""
        if not data.heldout:
            return {}
        started = time.perf_counter()
        scores = heldout_loss(model, data.heldout, self.pad_id, self.cfg.eval.batch_size)
        return {"heldout": scores, "eval_seconds": time.perf_counter() - started}

    def _write_metrics(self, record: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl (after the round's checkpoint) and report it."""
        with (self.output_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        text = f"round {record['round']}:"
        if record.get("clients"):
            losses = [c["train_loss"] for c in record["clients"]]
            text += f" train loss {sum(losses) / len(losses):.4f}"
        if "heldout" in record:
            text += f" held-out loss {record['heldout']['overall']['loss']:.4f}"
        console.print(text + (f" ({record['seconds']:.1f}s)" if "seconds" in record else ""))
