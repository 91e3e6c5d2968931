"""In-process simulation engine: many clients, one base model in memory.

A round reads top to bottom: select clients → for each, load the global adapter into the
shared model and run the local trainer on its pre-tokenised records → the strategy
aggregates the updates → evaluate → commit the round (checkpoint, metrics line and
per-client state in one atomic rename; fedit.engine.checkpoint) → append its metrics line
to metrics.jsonl. Nothing is written to output_dir before the config, the data and the
model are ready, and --resume continues a run only with a config that cannot change the
rounds already trained (fedit.engine.run_dir). Client training
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
β·(log π − log π_ref), π_ref the base model W0) are reported beside the held-out loss.
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
from fedit.client.dpo_trainer import pair_logps, reference_logps, train_client_dpo
from fedit.client.precision import half_precision_frozen_weights
from fedit.client.trainer import NonFiniteTrainingError, round_learning_rate, train_client
from fedit.config import ConfigError, RunConfig, TrainConfig
from fedit.data.preferences import TokenizedPair
from fedit.engine.checkpoint import (
    Checkpoint,
    ClientStateStore,
    completed_rounds,
    load_checkpoint,
    metrics_record,
    round_dir,
    save_checkpoint,
)
from fedit.engine.federation_data import (
    FederationData,
    centralized_steps,
    prepare_data,
    round_objective,
)
from fedit.engine.run_dir import (
    METRICS,
    append_metrics,
    check_resume,
    prepare_run_dir,
    rebuild_metrics,
    write_atomic,
)
from fedit.eval.loss import heldout_loss
from fedit.models.adapters import (
    attach_lora,
    get_adapter_state,
    lora_scaling,
    require_full_precision_base,
    set_adapter_state,
    set_base_residual,
)
from fedit.models.loading import load_model, load_tokenizer
from fedit.seeding import Stream, derive_seed
from fedit.server.selection import select_clients
from fedit.server.strategies import build_strategy
from fedit.server.validation import AllUpdatesRejectedError, Rejection, reject_non_finite
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
        self.client_references: list[torch.Tensor] | None = None  # fixed DPO π_ref, per client

    def run(self, resume: bool = False) -> Path:
        """Train all rounds (continuing after the last checkpoint with `resume`).

        Nothing is written to output_dir before the config, the data and the model with its
        adapter are ready: a command that fails on bad input leaves the directory as it was.
        """
        cfg, out = self.cfg, self.output_dir
        done = completed_rounds(out)
        if done and not resume:
            raise ConfigError(
                f"{out} already holds rounds up to {done[-1]}: "
                "pass --resume to continue it, or choose another output_dir"
            )
        if resume:
            check_resume(out, cfg, done)
        final = round_dir(out, cfg.federation.rounds)
        if done and done[-1] == cfg.federation.rounds:
            rebuild_metrics(out, done)  # a line a crash in the last round cut short
            console.print(f"{out} already completed {done[-1]} rounds: global adapter in {final}")
            return final
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        tokenizer = load_tokenizer(cfg.model)
        self.pad_id = tokenizer.pad_token_id
        data = prepare_data(cfg, tokenizer)
        self._describe(data)
        train_cfgs = self._train_configs(data)
        model = attach_lora(load_model(cfg.model), cfg.lora, cfg.seed)
        if cfg.strategy.lora_aggregation == "exact":  # "auto" may have resolved to half
            require_full_precision_base(model)
        strategy = build_strategy(cfg.strategy, data.num_clients)
        strategy.lora_scaling = lora_scaling(cfg.lora)
        # Client state of the resumed phase only: sft_then_dpo resets it at the switch.
        phase = [
            n for n in done if round_objective(cfg, n - 1) == round_objective(cfg, done[-1] - 1)
        ]
        self.client_state = ClientStateStore([round_dir(out, n) for n in phase])
        strategy.set_client_store(self.client_state)
        # Before _restore folds any exact-aggregation residual into the base: π_ref = W0.
        self.heldout_reference = self._base_logps(model, data.heldout_pairs)
        self.client_references = self._run_references(model, data, train_cfgs)
        start, global_state, residual = self._restore(model, strategy, done)
        prepare_run_dir(out, cfg, done)  # the run's first write
        if start == 0 and cfg.eval.at_start:
            self._commit_start(model, data)
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
        console.print(
            f"[bold green]done[/]: global adapter in {escape(str(final))}, metrics in "
            f"{escape(str(out / METRICS))}"
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
        directory = round_dir(self.output_dir, last)
        checkpoint = load_checkpoint(model, directory, last)
        saved_by = checkpoint.run_state.get("strategy")
        if saved_by != self.cfg.strategy.name:  # FedAvgM's "v." state loads into FedAdam's
            raise ConfigError(
                f"{directory / 'state.json'}: the checkpoint was written by strategy "
                f"{saved_by!r}, the config asks for {self.cfg.strategy.name!r}"
            )
        strategy.load_state_dict(checkpoint.server_state)
        set_base_residual(model, self.base_originals, checkpoint.base_residual)
        console.print(f"resuming after round {last}")
        return last, checkpoint.global_state, checkpoint.base_residual

    def _round(self, r, model, strategy, data, train_cfgs, global_state, residual):
        """Round r + 1: select → train the clients → aggregate → evaluate → commit."""
        cfg, fed = self.cfg, self.cfg.federation
        started = time.perf_counter()
        chosen = select_clients(data.num_clients, fed.clients_per_round, fed.fraction, cfg.seed, r)
        if fed.mode != "federated":
            chosen = [0]
        objective = round_objective(cfg, r)
        train_cfg = train_cfgs[objective]
        self._prepare_round(r, strategy, model, data, train_cfg, global_state, residual)
        lr = round_learning_rate(train_cfg, r, fed.rounds)
        updates, rejected = self._train_clients(
            r, chosen, objective, model, strategy, data, train_cfg, lr, global_state
        )
        updates, refused = reject_non_finite(updates)  # before any server state is touched
        rejected += refused
        if not updates:
            raise AllUpdatesRejectedError(r + 1, rejected)
        global_state = strategy.aggregate(global_state, updates, r)
        residual = self._fold_residual(model, strategy, residual)
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
        if rejected:
            record["rejected"] = [rejection.as_record() for rejection in rejected]
        if r + 1 == fed.rounds or (r + 1) % cfg.eval.every_rounds == 0:
            record.update(self._evaluate(model, data))
        record["seconds"] = time.perf_counter() - started
        self._commit(model, strategy, record, global_state, residual)
        return global_state, residual

    def _train_clients(
        self, r, chosen, objective, model, strategy, data, train_cfg, lr, global_state
    ) -> tuple[list[ClientUpdate], list[Rejection]]:
        """Each chosen client's local round, from the global adapter; a client whose
        training went non-finite is a Rejection, left out of the aggregate."""
        cfg = self.cfg
        updates, rejected = [], []
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
                    seed=derive_seed(cfg.seed, Stream.CLIENT_DATA, r, k),
                    pad_id=self.pad_id,
                    hook=strategy.client_hook(k, global_state),
                    show_progress=self.show_progress,
                )
                if isinstance(update, Rejection):
                    rejected.append(update)
                else:
                    updates.append(update)
        return updates, rejected

    def _fold_residual(self, model, strategy, residual):
        """Add the aggregation's exact-LoRA residual (if any) into the frozen base weights."""
        new_residual = strategy.take_base_residual()
        if new_residual:
            residual = {k: residual.get(k, 0) + v for k, v in new_residual.items()}
            set_base_residual(model, self.base_originals, residual)
        return residual

    def _commit(self, model, strategy, record, global_state, residual) -> None:
        """Save the round atomically (its checkpoint holds its metrics line and its clients'
        new state), then append the line to metrics.jsonl."""
        cfg, round_number = self.cfg, record["round"]
        checkpoint = Checkpoint(
            round_number=round_number,
            global_state=global_state,
            server_state=strategy.state_dict(),
            base_residual=residual,
            run_state={"round": round_number, "seed": cfg.seed, "strategy": cfg.strategy.name},
            metrics=json.dumps(record),
            client_state=self.client_state.pending(),
        )
        self.client_state.commit(save_checkpoint(self.output_dir, model, checkpoint, cfg))
        self._write_metrics(record)

    def _commit_start(self, model, data: FederationData) -> None:
        """Round 0's line, the starting model: its own record file, then metrics.jsonl."""
        record = {"round": 0, **self._evaluate(model, data)}
        write_atomic(metrics_record(self.output_dir, 0), json.dumps(record))
        self._write_metrics(record)

    def _train_client(
        self, objective: str, model, data: FederationData, k: int, train_cfg, **kwargs: Any
    ) -> ClientUpdate | Rejection:
        """Client k's local round on the round's objective: its records or its pairs; a
        Rejection (left out of the aggregate) if its loss or gradients went non-finite."""
        try:
            if objective == "dpo":
                pairs, references = data.pair_clients[k], self.client_references
                reference = None if references is None else references[k]
                return train_client_dpo(
                    model,
                    pairs,
                    train_cfg,
                    self.cfg.dpo,
                    client_id=k,
                    reference=reference,
                    **kwargs,
                )
            return train_client(model, data.clients[k], train_cfg, client_id=k, **kwargs)
        except NonFiniteTrainingError as err:
            return Rejection(k, err.reason)

    def _prepare_round(self, r, strategy, model, data, train_cfg, global_state, residual) -> None:
        """What round r needs before its clients train: fresh server state where the
        objective changes (sft_then_dpo's first DPO round, see Strategy.reset; also when a
        run resumes there), and the "sft" DPO reference once the SFT rounds are done."""
        objective = round_objective(self.cfg, r)
        if r > 0 and objective != round_objective(self.cfg, r - 1):
            strategy.reset()
        sft_reference = self.cfg.dpo.reference == "sft"
        if objective == "dpo" and sft_reference and self.client_references is None:
            self.client_references = self._sft_references(
                model, data, r, train_cfg, global_state, residual
            )

    def _run_references(self, model, data: FederationData, train_cfgs) -> list | None:
        """DPO π_ref log-probs of every client's pairs that are fixed from the start: "base"
        (W0: computed before any exact-aggregation residual is folded in, as the held-out
        reference is) and "sft" in a pure DPO run (its starting model, B = 0, also W0)."""
        dpo = self.cfg.dpo
        fixed = dpo.reference == "base" or (dpo.reference == "sft" and dpo.sft_rounds == 0)
        if self.cfg.train.objective == "sft" or not fixed:
            return None
        return self._client_logps(model, data, train_cfgs["dpo"])

    def _sft_references(self, model, data, r, train_cfg, global_state, residual) -> list:
        """The "sft" π_ref: each client's log-probs under the global model after the SFT
        rounds. In round sft_rounds the model holds it; a run resumed later loads that
        round's checkpoint (adapter and residual) for the pass, then restores the present."""
        sft_end = self.cfg.dpo.sft_rounds
        if r == sft_end:
            set_adapter_state(model, global_state)
            return self._client_logps(model, data, train_cfg)
        checkpoint = load_checkpoint(model, round_dir(self.output_dir, sft_end), sft_end)
        set_base_residual(model, self.base_originals, checkpoint.base_residual)
        try:
            return self._client_logps(model, data, train_cfg)
        finally:
            set_base_residual(model, self.base_originals, residual)
            set_adapter_state(model, global_state)

    def _client_logps(self, model, data: FederationData, train_cfg) -> list[torch.Tensor]:
        """(N_k, 2) reference log-probs of each client's pairs under `model` as it is (or
        with its adapter disabled for "base"), at the training precision."""
        dpo, pad_id = self.cfg.dpo, self.pad_id
        return [
            reference_logps(model, pairs, range(len(pairs)), train_cfg, dpo, pad_id)
            for pairs in data.pair_clients
        ]

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
        """Append a committed round's line to metrics.jsonl and report it."""
        append_metrics(self.output_dir, json.dumps(record))
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
