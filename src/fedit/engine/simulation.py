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
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from tqdm.auto import tqdm

from fedit.client.dpo import preference_scores
from fedit.client.dpo_trainer import pair_logps, train_client_dpo
from fedit.client.precision import half_precision_frozen_weights
from fedit.client.trainer import round_learning_rate, train_client
from fedit.config import ConfigError, RunConfig, TrainConfig
from fedit.data.preferences import TokenizedPair
from fedit.engine.checkpoint import (
    Checkpoint,
    completed_rounds,
    load_checkpoint,
    round_dir,
    save_checkpoint,
)
from fedit.engine.federation_data import (
    FederationData,
    centralized_steps,
    prepare_data,
    round_objective,
)
from fedit.eval.loss import heldout_loss
from fedit.models.adapters import (
    attach_lora,
    get_adapter_state,
    lora_scaling,
    set_adapter_state,
    set_base_residual,
)
from fedit.models.loading import load_model, load_tokenizer
from fedit.seeding import derive_seed
from fedit.server.selection import select_clients
from fedit.server.strategies import build_strategy
from fedit.types import ClientUpdate

console = Console(stderr=True)


class Simulation:
    """Runs one configured federation (or baseline) in this process."""

    def __init__(self, cfg: RunConfig, show_progress: bool = True) -> None:
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.show_progress = show_progress
        self.heldout_reference: torch.Tensor | None = None  # base log-probs of held-out pairs
        self.base_originals: dict[str, torch.Tensor] = {}  # W0 of weights with a residual

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
            f"[bold green]done[/]: global adapter in {escape(str(final))}, metrics in "
            f"{escape(str(self.output_dir / 'metrics.jsonl'))}"
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
        for warning in data.heldout_warnings:  # e.g. max_seq_len dropped every held-out record
            console.print(f"[bold yellow]warning[/]: {escape(warning)}")

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
        set_base_residual(model, self.base_originals, checkpoint.base_residual)
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
        with half_precision_frozen_weights(
            model, train_cfg.mixed_precision, train_cfg.half_precision_frozen_weights
        ):  # one cast per round, shared by its clients
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
            residual = {k: residual.get(k, 0) + v for k, v in new_residual.items()}
            set_base_residual(model, self.base_originals, residual)
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
