"""In-process simulation engine: many clients, one base model in memory.

The rounds are fedit.engine.rounds.RoundLoop's, shared with the deployment engine; what is
the simulation's own is here: every client's records prepared and tokenised once in this
process, and ``InProcessRunner``, which trains the round's clients one after the other on
the one shared model (each a fedit.client.session.LocalClient), drops those its simulated
devices leave out ([system], fedit.fleet.devices) and probes candidates' losses for
power-of-choice selection. Nothing is written to
output_dir before the config, the data and the model are ready, and --resume continues a
run only with a config that cannot change the rounds already trained
(fedit.engine.run_dir).

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

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from fedit.client.precision import half_precision_frozen_weights
from fedit.client.session import LocalClient
from fedit.client.trainer import steps_per_round
from fedit.config import RunConfig, TrainConfig, rules
from fedit.data.readers import skipped_summary
from fedit.engine.assembly import (
    assemble,
    federation_heldout,
    fix_references,
    in_process_clients,
    reference_after_sft,
    reference_at_start,
)
from fedit.engine.checkpoint import load_checkpoint, round_dir
from fedit.engine.federation_data import (
    FederationData,
    centralized_steps,
    prepare_data,
    round_objective,
)
from fedit.engine.rounds import RoundLoop, completed_run, finished
from fedit.engine.runner import RoundPlan, RoundReplies
from fedit.eval.attack import final_attack_eval
from fedit.eval.loss import heldout_loss
from fedit.fleet.devices import (
    Fate,
    devices,
    fate,
    online_clients,
    round_seconds,
    transfer_bytes,
)
from fedit.models.adapters import (
    set_adapter_state,
    set_base_residual,
)
from fedit.ops.ranks import rank_shapes
from fedit.protocol.traffic import round_trip_bytes, run_header
from fedit.protocol.wire import RunHeader, shapes_of
from fedit.seeding import Stream, derive_seed
from fedit.types import AdapterState, Rejection

console = Console(stderr=True)


class Simulation:
    """Runs one configured federation (or baseline) in this process."""

    def __init__(
        self, cfg: RunConfig, show_progress: bool = True, score_attack: bool = True
    ) -> None:
        self.cfg = cfg
        self.show_progress = show_progress
        # a data attack's success after the last round (fedit compare scores it itself)
        self.score_attack = score_attack

    def run(self, resume: bool = False) -> Path:
        """Train all rounds (continuing after the last checkpoint with `resume`).

        Nothing is written to output_dir before the config, the data and the model with its
        adapter are ready: a command that fails on bad input leaves the directory as it was.
        """
        cfg = self.cfg
        rules.check(cfg, "train")
        done = completed_run(cfg, resume)
        if finished(cfg, done):
            return round_dir(Path(cfg.output_dir), cfg.federation.rounds)
        parts = assemble(cfg, self._prepare, cfg.train.threads)
        (data, train_cfgs), model, tokenizer = parts.data, parts.model, parts.tokenizer
        base_originals: dict[str, torch.Tensor] = {}  # W0 of weights with a residual
        clients = in_process_clients(cfg, data, parts.pad_id)
        runner = InProcessRunner(cfg, model, clients, base_originals, self.show_progress)
        loop = RoundLoop(
            cfg,
            model,
            runner,
            num_clients=data.num_clients,
            train_cfgs=train_cfgs,
            base_originals=base_originals,
            held_out=federation_heldout(data, parts.pad_id),
            show_progress=self.show_progress,
            final_eval=final_attack_eval(cfg, tokenizer, data.heldout_records)
            if self.score_attack
            else None,
            loss_probe=runner.probe_losses,
        )
        # Before the loop restores (and folds) any exact-aggregation residual: π_ref = W0.
        runner.fix_references_at_start(train_cfgs)
        return loop.run(done)

    def _prepare(self, cfg: RunConfig, tokenizer) -> tuple[FederationData, dict[str, TrainConfig]]:
        """Every client's data, described, and the train config of each objective (before
        the model is loaded: a run refused for its data costs no model load)."""
        data = prepare_data(cfg, tokenizer)
        self._describe(data)
        return data, self._train_configs(data)

    def _describe(self, data: FederationData) -> None:
        cfg = self.cfg
        text = f"[bold]fedit[/] {cfg.federation.mode}: {data.num_clients} client(s)"
        if cfg.data.path:
            text += (
                f", {sum(map(len, data.clients))} training records, {len(data.heldout)} held "
                f"out; {data.report.summary()}"
            )
            if data.skipped:
                text += f", {len(data.skipped)} bad record(s) skipped"
        if data.pair_report is not None:
            text += (
                f"; {sum(map(len, data.pair_clients))} training pairs, "
                f"{len(data.heldout_pairs)} held out; {data.pair_report.summary()}"
            )
        console.print(text)
        if data.skipped:  # data.on_bad_record = "skip": never silent
            console.print(f"[bold yellow]warning[/]: {escape(skipped_summary(data.skipped))}")
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


class InProcessRunner:
    """The simulation's ClientRunner: the round's clients train one after the other on the
    one shared model, each starting from the global adapter."""

    def __init__(
        self,
        cfg: RunConfig,
        model: torch.nn.Module,
        clients: list[LocalClient],
        base_originals: dict[str, torch.Tensor],
        show_progress: bool,
    ) -> None:
        self.cfg, self.model, self.clients = cfg, model, clients
        self.base_originals, self.show_progress = base_originals, show_progress
        self.references_fixed = False  # every client's fixed DPO π_ref computed
        self.header: RunHeader | None = None  # what each task's message would carry
        # [system]: every client's simulated device (None: no device model)
        self.fleet = devices(cfg, len(clients)) if cfg.system.enabled else None

    def run_round(self, plan: RoundPlan, global_state: AdapterState) -> RoundReplies:
        """Each task's local round; a client whose training went non-finite is rejected.
        Traffic is what a deployment would send and receive for the same tasks. With
        simulated devices a client offline or past the deadline is dropped untrained."""
        self._sft_references(plan, global_state)
        if self.header is None:
            self.header = run_header(self.cfg, self.model)
        replies = RoundReplies(updates=[])
        train_cfg = plan.train_cfg
        fates = self._fates(plan, global_state)
        cast = partial(
            half_precision_frozen_weights,
            self.model,
            train_cfg.mixed_precision,
            train_cfg.half_precision_frozen_weights,
        )
        # One cast per round, shared by its clients, unless each has its own base weights.
        own_bases = plan.unseen_scaling is not None
        with nullcontext() if own_bases else cast():
            for task in plan.tasks:
                client = self.clients[task.client_id]
                if fates and (why := fates[task.client_id].dropped):
                    replies.dropped.append(Rejection(task.client_id, why))
                    continue
                with self._own_base(plan, global_state, client.rank, cast if own_bases else None):
                    update = client.train(
                        self.model, global_state, task, train_cfg, self.show_progress
                    )
                if self.cfg.federation.mode == "federated":  # a baseline's trainer sends nothing
                    replies.traffic[task.client_id] = round_trip_bytes(
                        task, global_state, self.header, update, client.rank, self.cfg.lora.shared
                    )
                if isinstance(update, Rejection):
                    replies.rejected.append(update)
                else:
                    replies.updates.append(update)
        if self.fleet is not None:
            replies.simulated_seconds = round_seconds(self.cfg, list(fates.values()))
        return replies

    @contextmanager
    def _own_base(
        self,
        plan: RoundPlan,
        global_state: AdapterState,
        rank: int | None,
        cast: Callable[[], AbstractContextManager] | None,
    ) -> Iterator[None]:
        """A client's training under its own base weights where it has them
        (RoundPlan.start_residual), then cast to half precision (`cast`) on their own; the
        round's base is put back after."""
        residual = plan.start_residual(self.model, global_state, rank)
        if residual is not None:
            set_base_residual(self.model, self.base_originals, residual)
        try:
            with nullcontext() if cast is None else cast():
                yield
        finally:
            if residual is not None:
                back = {
                    k: plan.base_residual.get(k, torch.zeros_like(t)) for k, t in residual.items()
                }
                set_base_residual(self.model, self.base_originals, back)

    def probe_losses(
        self, candidates: list[int], global_state: AdapterState, round_index: int
    ) -> dict[int, float]:
        """power_of_choice's probe: each candidate's held-out-style loss under the global
        adapter on federation.probe_records of its records (a seeded sample per round and
        client, so a resumed round probes the same ones); a client without records is not
        a candidate."""
        cfg = self.cfg
        set_adapter_state(self.model, global_state)
        losses = {}
        for k in candidates:
            examples = self.clients[k].examples
            if not examples:
                continue
            rng = np.random.default_rng(derive_seed(cfg.seed, Stream.SELECTION, round_index, k))
            size = min(cfg.federation.probe_records, len(examples))
            sample = [examples[i] for i in sorted(rng.choice(len(examples), size, replace=False))]
            scores = heldout_loss(self.model, sample, self.clients[k].pad_id, cfg.eval.batch_size)
            losses[k] = scores["overall"]["loss"]
        return losses

    def _fates(self, plan: RoundPlan, global_state: AdapterState) -> dict[int, Fate]:
        """{client: what its simulated device makes of its task} ({} without devices)."""
        if self.fleet is None:
            return {}
        online = set(online_clients(self.cfg, self.fleet, plan.round_index))
        shapes = shapes_of(global_state)
        fates = {}
        for task in plan.tasks:
            client = self.clients[task.client_id]
            down, up = transfer_bytes(self.cfg, rank_shapes(shapes, client.rank))
            records = len(client.pairs if plan.objective == "dpo" else client.examples)
            steps = steps_per_round(records, plan.train_cfg)
            device = self.fleet[task.client_id]
            fates[task.client_id] = fate(
                self.cfg, device, task.client_id in online, steps, down, up
            )
        return fates

    def fix_references_at_start(self, train_cfgs: dict[str, TrainConfig]) -> None:
        """DPO π_ref log-probs of every client's pairs that are fixed from the start: "base"
        (W0: computed before any exact-aggregation residual is folded in, as the held-out
        reference is) and "sft" in a pure DPO run (its starting model, B = 0, also W0)."""
        if self.cfg.train.objective == "sft" or not reference_at_start(self.cfg.dpo):
            return
        self._compute_references(train_cfgs["dpo"])

    def _sft_references(self, plan: RoundPlan, global_state: AdapterState) -> None:
        """The "sft" π_ref, once the SFT rounds are done: each client's log-probs under the
        global model after them. In round sft_rounds + 1 the global adapter is that model;
        a run resumed later loads round sft_rounds' checkpoint (adapter and residual) for
        the pass, then restores the present."""
        dpo = self.cfg.dpo
        if plan.objective != "dpo" or not reference_after_sft(dpo) or self.references_fixed:
            return
        sft_end, model = dpo.sft_rounds, self.model
        if plan.round_index == sft_end:
            self._compute_references(plan.train_cfg, global_state)
            return
        directory = round_dir(Path(self.cfg.output_dir), sft_end)
        checkpoint = load_checkpoint(model, directory, sft_end)
        set_base_residual(model, self.base_originals, checkpoint.base_residual)
        try:
            self._compute_references(plan.train_cfg)
        finally:
            set_base_residual(model, self.base_originals, plan.base_residual)
            set_adapter_state(model, global_state)

    def _compute_references(
        self, train_cfg: TrainConfig, adapter: AdapterState | None = None
    ) -> None:
        fix_references(self.clients, self.model, train_cfg, adapter)
        self.references_fixed = True
