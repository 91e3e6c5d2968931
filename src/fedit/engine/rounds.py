"""The round loop every engine shares: what a round does, written once.

A round reads top to bottom: select clients → ask the strategy what each must do → hand
the clients their tasks (``ClientRunner``: in this process for the simulation, over
Flower for a deployment) → reject malformed or out-of-bounds updates
(fedit.server.validation) → the strategy aggregates → fold an
exact-aggregation residual into the base → evaluate on the held-out set → commit the round
(checkpoint, metrics line and per-client server state in one atomic rename;
fedit.engine.checkpoint) → append its metrics line to metrics.jsonl. ``--resume`` restores
the last committed round's adapter, server state and residual. Nothing here knows how
clients are reached, so both engines train, aggregate and save bit for bit the same way.

``RoundLoop._round`` reads plan → run → accept → aggregate → commit; the rest lives beside
it: the plan and replies a ClientRunner carries (fedit.engine.runner), the transforms of
the clients' updates (fedit.engine.update_transforms), the metrics line and its console
line (fedit.engine.round_record), the held-out scoring (fedit.engine.heldout).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from tqdm.auto import tqdm

from fedit import attacks
from fedit.client.trainer import round_learning_rate, steps_per_round
from fedit.config import ConfigError, RunConfig, TrainConfig, clients_per_round
from fedit.engine.checkpoint import (
    Checkpoint,
    ClientStateStore,
    accepted_rounds,
    asked_clients,
    committed_records,
    completed_rounds,
    load_checkpoint,
    metrics_record,
    round_dir,
    save_checkpoint,
)
from fedit.engine.federation_data import round_objective
from fedit.engine.heldout import HeldOutScorer, HeldOutSet
from fedit.engine.round_record import round_line, round_record
from fedit.engine.run_dir import (
    METRICS,
    append_metrics,
    check_resume,
    prepare_run_dir,
    rebuild_metrics,
)
from fedit.engine.runner import ClientRunner, LossProbe, RoundPlan, RoundReplies
from fedit.engine.update_transforms import apply, unseen_part, update_transforms
from fedit.errors import RunStopped, write_atomic
from fedit.fleet.devices import round_candidates
from fedit.fleet.selection import highest_losses
from fedit.models.adapters import (
    get_adapter_state,
    in_base_layout,
    lora_scaling,
    set_adapter_state,
    set_base_residual,
)
from fedit.ops.ranks import client_ranks
from fedit.ops.sharing import with_kept
from fedit.privacy import resolve_plan, selection_seed
from fedit.seeding import Stream, derive_seed
from fedit.server.aggregators import build_aggregator
from fedit.server.strategies import build_strategy
from fedit.server.validation import (
    AllUpdatesRejectedError,
    RoundExpectations,
    validate_updates,
)
from fedit.types import AdapterState, ClientTask, ClientUpdate, Rejection

console = Console(stderr=True)


class TooFewRepliesError(RunStopped):
    """Fewer valid updates than deploy.min_replies: the round is not committed."""

    def __init__(self, round_number: int, got: int, needed: int, missing: list[Rejection]):
        listed = "; ".join(f"client {r.client_id}: {r.reason}" for r in missing)
        super().__init__(
            f"round {round_number}: {got} valid update(s), {needed} needed ({listed}); the "
            "rounds before it are saved: fix the clients and continue with --resume"
        )


def completed_run(cfg: RunConfig, resume: bool) -> list[int]:
    """The rounds already committed in cfg.output_dir, after checking that this start may
    use them: a run with rounds needs --resume, and --resume needs a compatible config."""
    out = Path(cfg.output_dir)
    done = completed_rounds(out)
    if done and not resume:
        raise ConfigError(
            f"{out} already holds rounds up to {done[-1]}: "
            "pass --resume to continue it, or choose another output_dir"
        )
    if resume:
        check_resume(out, cfg, done)
    return done


def finished(cfg: RunConfig, done: list[int]) -> bool:
    """Whether every round is committed (then the last metrics line is made whole)."""
    out = Path(cfg.output_dir)
    if not done or done[-1] != cfg.federation.rounds:
        return False
    rebuild_metrics(out, done)  # a line a crash in the last round cut short
    final = round_dir(out, cfg.federation.rounds)
    console.print(f"{out} already completed {done[-1]} rounds: global adapter in {final}")
    return True


@dataclass
class AcceptedUpdates:
    """A round's replies once checked: what the strategy aggregates and what the record
    says of the clients."""

    updates: list[ClientUpdate]  # sorted by client id, transformed for aggregation
    rejected: list[Rejection]
    clients: list[dict[str, Any]]  # one record per aggregated client


class RoundLoop:
    """Runs the rounds of one configured federation (or baseline) against a ClientRunner.

    ``model`` is the coordinator's model (in the simulation, also the clients'): it holds
    the global adapter for evaluation and checkpoints. ``held_out`` is the coordinator's
    held-out set, tokenised (None: nothing held out).
    """

    def __init__(
        self,
        cfg: RunConfig,
        model: torch.nn.Module,
        runner: ClientRunner,
        *,
        num_clients: int,
        train_cfgs: dict[str, TrainConfig],
        base_originals: dict[str, torch.Tensor],
        held_out: HeldOutSet | None = None,
        min_replies: int = 1,
        show_progress: bool = True,
        final_eval: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
        loss_probe: LossProbe | None = None,
    ) -> None:
        self.cfg, self.model, self.runner = cfg, model, runner
        self.output_dir = Path(cfg.output_dir)
        self.num_clients, self.train_cfgs = num_clients, train_cfgs
        self.base_originals = base_originals  # W0 of weights with a residual, shared
        self.min_replies, self.show_progress = min_replies, show_progress
        self.final_eval = final_eval  # the attack's success after the last round, or None
        self.loss_probe = loss_probe  # None where fedit.config.rules refuses power_of_choice
        self.strategy = build_strategy(
            cfg.strategy, num_clients, build_aggregator(cfg, num_clients)
        )
        self.strategy.lora_scaling = lora_scaling(cfg.lora)
        self.privacy = resolve_plan(cfg, num_clients)  # None: privacy.mode = "off"
        self.selection_seed = selection_seed(cfg)
        if self.privacy is not None:
            console.print(escape(self.privacy.describe()))
        self.attack: dict[str, Any] = {}  # every round line's "attack" entry
        if cfg.attack.kind != "none":
            malicious = attacks.malicious_clients(cfg, num_clients)
            self.attack = {"kind": cfg.attack.kind, "clients": malicious}
            console.print(escape(attacks.describe(cfg, malicious)))
        # Before _restore folds any exact-aggregation residual into the base: π_ref = W0.
        self.scorer = HeldOutScorer(model, held_out or HeldOutSet(), cfg)
        self.client_state = ClientStateStore([])
        # {client: the last round that aggregated its update}: where its error feedback
        # continues from (fedit.client.feedback), rebuilt from the records on resume
        self.accepted: dict[int, int] = {}
        # {client: the rounds it was asked to train in}: local DP's releases (PrivacyPlan)
        self.asked: Counter[int] = Counter()
        self.ranks = client_ranks(cfg, num_clients)  # mixed LoRA ranks, or None
        self.transforms = update_transforms(cfg, self.ranks)
        self.clock = 0.0  # [system]: the simulated seconds of the rounds so far
        if cfg.lora.shared != "all":
            console.print(
                "lora.shared = 'A' (FedSA-LoRA): each client keeps its B factors, so the "
                "global adapter alone is the base model and is not evaluated each round; "
                "score the clients' own adapters with `fedit personalize`"
            )

    def run(self, done: list[int]) -> Path:
        """Train the rounds after `done` (completed_run's answer) and return the final
        round's directory."""
        cfg, out = self.cfg, self.output_dir
        # Client state of the resumed phase only: sft_then_dpo resets it at the switch.
        phase = [
            n for n in done if round_objective(cfg, n - 1) == round_objective(cfg, done[-1] - 1)
        ]
        self.client_state = ClientStateStore([round_dir(out, n) for n in phase])
        self.strategy.set_client_store(self.client_state)
        records = committed_records(out, done)
        self.accepted = accepted_rounds(records)
        self.asked = Counter()
        for n in done:  # a round an older fedit saved without a record: its schedule
            named = records.get(n)
            self.asked.update(
                asked_clients(named)
                if named is not None
                else round_candidates(cfg, self.num_clients, self.selection_seed, n - 1)
            )
        if done and done[-1] in records:
            self.clock = records[done[-1]].get("simulated_clock", 0.0)
        start, global_state, residual = self._restore(done)
        prepare_run_dir(out, cfg, done)  # the run's first write
        if start == 0 and cfg.eval.at_start:
            self._commit_start()
        rounds = range(start, cfg.federation.rounds)
        for r in tqdm(
            rounds,
            desc="rounds",
            initial=start,
            total=cfg.federation.rounds,
            disable=not self.show_progress,
        ):
            global_state, residual = self._round(r, global_state, residual)
        final = round_dir(out, cfg.federation.rounds)
        console.print(
            f"[bold green]done[/]: global adapter in {escape(str(final))}, metrics in "
            f"{escape(str(out / METRICS))}"
        )
        return final

    def _restore(self, done: list[int]):
        if not done:
            return 0, get_adapter_state(self.model), {}
        last = done[-1]
        directory = round_dir(self.output_dir, last)
        checkpoint = load_checkpoint(self.model, directory, last)
        saved_by = checkpoint.run_state.get("strategy")
        if saved_by != self.cfg.strategy.name:  # FedAvgM's "v." state loads into FedAdam's
            raise ConfigError(
                f"{directory / 'state.json'}: the checkpoint was written by strategy "
                f"{saved_by!r}, the config asks for {self.cfg.strategy.name!r}"
            )
        self.strategy.load_checkpoint_state(checkpoint.server_state)
        set_base_residual(self.model, self.base_originals, checkpoint.base_residual)
        console.print(f"resuming after round {last}")
        return last, checkpoint.global_state, checkpoint.base_residual

    def plan(self, r: int, global_state: AdapterState, residual) -> RoundPlan:
        """Round r + 1's selection, learning rate, seeds and strategy instructions."""
        cfg, fed = self.cfg, self.cfg.federation
        chosen = round_candidates(cfg, self.num_clients, self.selection_seed, r)
        probed: dict[int, float] = {}
        if self.loss_probe is not None and fed.selection == "power_of_choice":
            probed = self.loss_probe(chosen, global_state, r)
            m = clients_per_round(self.num_clients, fed.clients_per_round, fed.fraction)
            chosen = highest_losses(probed, m)
        if fed.mode != "federated":
            chosen = [0]
        objective = round_objective(cfg, r)
        train_cfg = self.train_cfgs[objective]
        lr = round_learning_rate(train_cfg, r, fed.rounds)
        tasks = [
            ClientTask(
                round_number=r + 1,
                client_id=k,
                objective=objective,
                learning_rate=lr,
                seed=derive_seed(cfg.seed, Stream.CLIENT_DATA, r, k),
                instructions=self.strategy.client_instructions(k, global_state),
                feedback_round=self.accepted.get(k, 0),
            )
            for k in chosen
        ]
        exact = self.ranks is not None and cfg.strategy.lora_aggregation == "exact"
        scaling = self.strategy.lora_scaling if exact else None
        return RoundPlan(r, objective, train_cfg, lr, tasks, residual, probed, scaling)

    def _round(self, r: int, global_state: AdapterState, residual):
        """Round r + 1: plan → the clients train → accept → aggregate → commit."""
        started = time.perf_counter()
        if r > 0 and round_objective(self.cfg, r) != round_objective(self.cfg, r - 1):
            self.strategy.reset()  # sft_then_dpo: see Strategy.reset
        plan = self.plan(r, global_state, residual)
        replies = self.runner.run_round(plan, global_state)
        accepted = self._accept(r, plan, replies, global_state)
        global_state, residual = self._aggregate(r, plan, accepted.updates, global_state, residual)
        record = self._record(plan, replies, accepted)
        record["seconds"] = time.perf_counter() - started
        self._commit(record, global_state, residual)
        self.accepted.update({client["id"]: r + 1 for client in accepted.clients})
        return global_state, residual

    def _accept(
        self, r: int, plan: RoundPlan, replies: RoundReplies, global_state: AdapterState
    ) -> AcceptedUpdates:
        """The validated updates, sorted, or under secure aggregation the one pseudo-update
        of the sum, whose clients are recorded without their counts (weights are what it
        hides); before any server state changes."""
        if replies.aggregate is not None:
            update = replies.aggregate.update(global_state, plan.learning_rate)
            clients = [{"id": k, **metrics} for k, metrics in replies.aggregate.clients]
            return AcceptedUpdates([update], replies.rejected, clients)
        arrived = apply(self.transforms.on_arrival, replies.updates, global_state)
        updates, refused = validate_updates(arrived, self._expectations(plan, global_state))
        rejected = replies.rejected + refused
        self._require_replies(r, updates, rejected, replies.dropped)
        updates.sort(key=lambda u: u.client_id)  # replies may arrive in any order
        clients = [
            {"id": u.client_id, "num_examples": u.num_examples, **u.metrics} for u in updates
        ]
        updates = apply(self.transforms.for_aggregation, updates, global_state)
        return AcceptedUpdates(updates, rejected, clients)

    def _aggregate(
        self,
        r: int,
        plan: RoundPlan,
        updates: list[ClientUpdate],
        global_state: AdapterState,
        residual: dict[str, torch.Tensor],
    ) -> tuple[AdapterState, dict[str, torch.Tensor]]:
        """The strategy's step and the base residual it (and mixed ranks) leave, both set
        on the coordinator's model. No updates (the simulated devices left nobody this
        round; _require_replies) changes nothing."""
        unseen = {}
        if updates:
            if plan.unseen_scaling is not None:
                weighting = self.cfg.strategy.weighting
                unseen = unseen_part(
                    updates, global_state, self.ranks, weighting, plan.unseen_scaling
                )
            aggregated = self.strategy.aggregate(global_state, updates, r)
            # FedSA-LoRA: the global B stays B = 0 whatever the server step (e.g. DP noise)
            global_state = with_kept(aggregated, global_state, self.cfg.lora.shared)
        residual = self._fold_residual(residual, unseen)
        set_adapter_state(self.model, global_state)
        return global_state, residual

    def _record(
        self, plan: RoundPlan, replies: RoundReplies, accepted: AcceptedUpdates
    ) -> dict[str, Any]:
        """The round's metrics line (fedit.engine.round_record), with what the run has
        spent so far (privacy, simulated time) and, when due, the held-out scores."""
        aggregated_by = self.strategy if accepted.updates else None
        record = round_record(
            plan, replies, accepted.clients, accepted.rejected, aggregated_by, self.attack
        )
        round_number, last = plan.round_index + 1, self.cfg.federation.rounds
        self.asked.update(asked_clients(record))
        if self.privacy is not None:  # ε of the releases made: a repeated round makes none
            releases = self.privacy.releases_made(round_number, self.asked)
            record["privacy"] = self.privacy.record(releases)
        if replies.simulated_seconds is not None:
            self.clock += replies.simulated_seconds
            record["simulated_seconds"] = replies.simulated_seconds
            record["simulated_clock"] = self.clock
        if round_number == last or round_number % self.cfg.eval.every_rounds == 0:
            record.update(self.scorer.score())
        if round_number == last and self.final_eval is not None:
            record["attack"].update(self.final_eval(self.model))
        return record

    def _expectations(self, plan: RoundPlan, global_state: AdapterState) -> RoundExpectations:
        """What the round's updates must be, from the coordinator's own knowledge."""
        checks = self.cfg.validation
        return RoundExpectations(
            global_state=global_state,
            clients=frozenset(task.client_id for task in plan.tasks),
            learning_rate=plan.learning_rate,
            steps_for=lambda examples: steps_per_round(examples, plan.train_cfg),
            extras=self.strategy.update_extras,
            max_examples=checks.max_examples,
            max_update_norm=checks.max_update_norm,
        )

    def _require_replies(self, r, updates, rejected, dropped) -> None:
        """Stop before any server state changes when too few clients sent a valid update;
        with simulated devices ([system]) a round they left without any reply (offline,
        stragglers, or nobody online to select) is a round that changes nothing."""
        if self.cfg.system.enabled and not updates and not rejected:
            return
        if not updates and not dropped:
            raise AllUpdatesRejectedError(r + 1, rejected)
        if len(updates) < max(1, self.min_replies):
            raise TooFewRepliesError(r + 1, len(updates), self.min_replies, rejected + dropped)

    def _fold_residual(self, residual, unseen):
        """Add the aggregation's exact-LoRA residual (if any), and with mixed ranks what the
        clients' bases held beyond R (`unseen`), into the frozen base weights."""
        new_residual = self.strategy.take_base_residual()
        for key, part in unseen.items():
            new_residual[key] = new_residual.get(key, 0.0) + part
        new_residual = in_base_layout(self.model, new_residual)
        if new_residual:
            residual = {k: residual.get(k, 0) + v for k, v in new_residual.items()}
            set_base_residual(self.model, self.base_originals, residual)
        return residual

    def _commit(self, record, global_state, residual) -> None:
        """Save the round atomically (its checkpoint holds its metrics line and its clients'
        new state), then append the line to metrics.jsonl."""
        cfg, round_number = self.cfg, record["round"]
        checkpoint = Checkpoint(
            round_number=round_number,
            global_state=global_state,
            server_state=self.strategy.checkpoint_state(),
            base_residual=residual,
            run_state={"round": round_number, "seed": cfg.seed, "strategy": cfg.strategy.name},
            metrics=json.dumps(record),
            client_state=self.client_state.pending(),
        )
        saved = save_checkpoint(self.output_dir, self.model, checkpoint, cfg)
        self.client_state.commit(saved)
        self._write_metrics(record)

    def _commit_start(self) -> None:
        """Round 0's line, the starting model: its own record file, then metrics.jsonl."""
        record = {"round": 0, **self.scorer.score()}
        write_atomic(metrics_record(self.output_dir, 0), json.dumps(record))
        self._write_metrics(record)

    def _write_metrics(self, record: dict[str, Any]) -> None:
        """Append a committed round's line to metrics.jsonl and report it."""
        append_metrics(self.output_dir, json.dumps(record))
        console.print(round_line(record))
