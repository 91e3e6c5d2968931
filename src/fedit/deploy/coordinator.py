"""The coordinator's side of a deployment (`fedit coordinate`).

One long-lived process: it starts Flower's SuperLink as a child on 127.0.0.1 (TLS, node
authentication, ``--isolation process``), puts the fleet-only front on
``deploy.fleet_address`` (the only address bound beyond loopback; fedit.deploy.flower.front),
registers the roster's public keys, creates the Flower run, takes its ServerApp task
itself (fedit.deploy.flower.flower_io) and drives it with fedit's own round loop
(fedit.engine.rounds.RoundLoop) through ``FlowerRunner``. It writes the same run directory
a simulation writes, and ``--resume`` continues it after a crash.

Client ids are positions in ``deploy.clients`` (a roster of public keys): each round, the
online nodes are mapped to ids by the key they authenticate with, never by a name or a node
id they could choose. Whatever comes back is decoded and checked (fedit.protocol.wire, then
fedit.server.validation in the shared round) before the strategy sees it; a client that does
not answer in ``deploy.round_timeout`` is listed as dropped and the round goes on with the
others if at least ``deploy.min_replies`` valid updates came.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from flwr.app import Message, RecordDict
from rich.console import Console
from rich.markup import escape

from fedit.config import ConfigError, DeployConfig, RunConfig, rules
from fedit.deploy.flower.flower_io import ServerRun, acquire_server_run, exchange, online_nodes
from fedit.deploy.flower.flwr_cli import APP_DIR, register_node, submit_run, write_connection
from fedit.deploy.flower.front import FleetFront
from fedit.deploy.flower.processes import SuperLink, ensure_secret, free_port
from fedit.deploy.pki import load_public_key, load_public_key_file
from fedit.deploy.secagg.coordinator import SecureRound
from fedit.engine.assembly import assemble, heldout_files, reference_after_sft
from fedit.engine.checkpoint import load_global_adapter, round_dir
from fedit.engine.heldout import HeldOutSet
from fedit.engine.rounds import RoundLoop, completed_run, finished
from fedit.engine.runner import RoundPlan, RoundReplies
from fedit.errors import DeployError
from fedit.models.adapters import get_adapter_state, set_adapter_state
from fedit.ops.ranks import client_ranks, shrink
from fedit.ops.sharing import shared_part, with_zero_kept
from fedit.protocol import wire
from fedit.protocol.traffic import REFERENCE_GROUP, run_header, task_content
from fedit.server.strategies import STRATEGIES
from fedit.types import AdapterState, ClientTask, Rejection

console = Console(stderr=True)
CONNECTION = "coordinator"


def check_roster(deploy: DeployConfig) -> None:
    """Every data owner's public-key file in deploy.clients exists and loads."""
    for path in deploy.clients:
        if not Path(path).is_file():
            raise ConfigError(f"deploy.clients: {path}: no such file")
        load_public_key_file(Path(path))


# Per-client tensors the owner keeps itself (SCAFFOLD's c_k): sent by digest, and in full
# only when the owner answers that it lacks them.
RESENT_FOR = ("needs_c_k", "needs_reference")  # owner replies answered by a full resend


@dataclass
class _Sent:
    client_id: int
    task: ClientTask
    content: RecordDict


class FlowerRunner:
    """The deployment's ClientRunner: a round's tasks go to the owners' nodes as Flower
    messages; their replies come back decoded and checked. `nodes_by_client` maps the online
    nodes to client ids (by default by the roster's public keys; Flower's simulation runtime,
    whose nodes have no keys, passes its own: fedit.deploy.simulation_runtime)."""

    def __init__(
        self,
        cfg: RunConfig,
        model: torch.nn.Module,
        run: ServerRun,
        header: wire.RunHeader,
        nodes_by_client: Callable[[], dict[int, int]] | None = None,
    ) -> None:
        self.cfg, self.model, self.run, self.header = cfg, model, run, header
        self.shapes = wire.shapes_of(get_adapter_state(model))
        # what crosses the wire: all factors, or the shared A factors only (FedSA-LoRA)
        self.shared = cfg.lora.shared
        self.wire_shapes = shared_part(self.shapes, self.shared)
        self.roster = [load_public_key_file(Path(p)).public_numbers() for p in cfg.deploy.clients]
        self.nodes_by_client = nodes_by_client or self._nodes_by_key
        self.extras = set(STRATEGIES[cfg.strategy.name].update_extras)
        self.ranks = client_ranks(cfg, cfg.partition.num_clients)

    def run_round(self, plan: RoundPlan, global_state: AdapterState) -> RoundReplies:
        wanted = {t.client_id for t in plan.tasks}
        deploy = self.cfg.deploy
        self._wait_online(wanted, min(deploy.min_replies, len(wanted)), deploy.join_timeout)
        deadline = time.monotonic() + deploy.round_timeout
        # the rest get the first quarter of the round to come online, not all of it: a
        # client gone for good must leave the others time to train
        nodes = self._wait_online(wanted, len(wanted), deploy.round_timeout / 4)
        replies = RoundReplies(updates=[])
        online = []
        for task in plan.tasks:
            if task.client_id not in nodes:
                replies.dropped.append(Rejection(task.client_id, "offline"))
            else:
                online.append(task)
        if self.cfg.secagg.enabled:
            return SecureRound(self, plan, global_state, nodes, replies).run(online, deadline)
        # mixed LoRA ranks: a client's deltas are taken from the global adapter at its rank
        ranks = {t.client_id: self._rank(t.client_id) for t in online}
        uploads = {k: self._upload_codec(shrink(global_state, r)) for k, r in ranks.items()}
        sent = {}
        for task in online:
            rank = ranks[task.client_id]
            content = task_content(task, global_state, self.header, rank=rank, shared=self.shared)
            sent[task.client_id] = _Sent(task.client_id, task, content)
        answers = self._exchange(plan, sent, nodes, deadline, replies, uploads)
        # Owners that lack state they keep (c_k, the DPO reference: a new disk) get their
        # round again in full, within the same deadline.
        again = {k: s for k, s in sent.items() if answers.get(k) in RESENT_FOR}
        for s in again.values():
            full, rank = self._in_full(s.task), ranks[s.client_id]
            s.content = task_content(
                full, global_state, self.header, hold=False, rank=rank, shared=self.shared
            )
        if again:
            answers |= self._exchange(plan, again, nodes, deadline, replies, uploads)
        for k in sent:
            if answers.get(k) in RESENT_FOR:
                replies.dropped.append(Rejection(k, f"{answers[k]} even after re-sending"))
        return replies

    def _in_full(self, task: ClientTask) -> ClientTask:
        """The task with what an owner may have lost added: the SFT-end adapter of a
        dpo.reference = "sft" run after its first DPO round (round dpo.sft_rounds' checkpoint)."""
        dpo = self.cfg.dpo
        if task.objective != "dpo" or not reference_after_sft(dpo):
            return task
        if task.round_number == dpo.sft_rounds + 1:  # its global adapter is that model
            return task
        directory = round_dir(Path(self.cfg.output_dir), dpo.sft_rounds)
        present = get_adapter_state(self.model)  # read through the model (PEFT key names)
        try:
            sft_end = load_global_adapter(self.model, directory)
        finally:
            set_adapter_state(self.model, present)
        tensors = {**task.instructions.tensors, REFERENCE_GROUP: sft_end}
        return replace(task, instructions=replace(task.instructions, tensors=tensors))

    def _rank(self, client_id: int) -> int | None:
        return None if self.ranks is None else self.ranks[client_id]

    def _upload_codec(self, global_state: AdapterState) -> wire.UploadCodec | None:
        """How a reply carries its update, from the `global_state` its client started
        from: None for float32 y_k."""
        compression = self.cfg.compression
        if compression.upload == "none":
            return None
        return wire.UploadCodec(compression.upload, compression.topk_fraction, global_state)

    def _exchange(self, plan, sent: dict, nodes, deadline, replies: RoundReplies, uploads) -> dict:
        """Send, wait, decode; the outcome per client ("ok", one of RESENT_FOR, or a drop)."""
        contents = {k: s.content for k, s in sent.items()}
        received = self.deliver(contents, nodes, "train", plan.round_index + 1, deadline, replies)
        return {k: self._accept(sent[k].task, c, replies, uploads[k]) for k, c in received.items()}

    def deliver(
        self,
        contents: dict[int, RecordDict],
        nodes: dict[int, int],
        message_type: str,
        round_number: int,
        deadline: float,
        replies: RoundReplies,
        stage: str = "",
    ) -> dict[int, RecordDict]:
        """Each client's content to its node, the replies' contents back by client (by
        `deadline`); every byte counted in `replies.traffic`, a client with no reply or an
        error reply listed in `replies.dropped` (`stage` names where, for a secure round)."""
        messages = []
        for k, content in contents.items():
            messages.append(
                Message(
                    content,
                    dst_node_id=nodes[k],
                    message_type=message_type,
                    group_id=str(round_number),
                    ttl=self.cfg.deploy.round_timeout + 60,
                )
            )
        by_node = exchange(self.run.grid, messages, deadline)
        where = f" ({stage})" if stage else ""
        received = {}
        for k, content in contents.items():
            traffic = replies.traffic.setdefault(k, {"bytes_down": 0, "bytes_up": 0})
            traffic["bytes_down"] += wire.content_bytes(content)
            reply = by_node.get(nodes[k])
            if reply is None:
                replies.dropped.append(Rejection(k, "timeout" + where))
                continue
            if reply.has_error():
                error = reply.error
                reason = f"error {error.code}: {error.reason[:200]}{where}"
                replies.dropped.append(Rejection(k, reason))
                continue
            traffic["bytes_up"] += wire.content_bytes(reply.content)
            received[k] = reply.content
        return received

    def _accept(self, task: ClientTask, content, replies, upload) -> str:
        k = task.client_id
        try:
            answer = wire.decode_reply(
                content, k, self.wire_shapes, self.extras, task.learning_rate, upload, self.ranks
            )
        except wire.WireError as err:
            replies.rejected.append(Rejection(k, f"malformed reply: {err}"))
            return "rejected"
        if isinstance(answer, wire.ReplyStatus):
            if answer.outcome not in RESENT_FOR:
                replies.rejected.append(Rejection(k, f"{answer.outcome}: {answer.reason}"))
            return answer.outcome
        state = with_zero_kept(answer.state, self.shapes, self.shared)
        replies.updates.append(replace(answer, state=state))  # RoundLoop validates it
        return "ok"

    def _wait_online(self, wanted: set[int], enough: int, timeout: float) -> dict[int, int]:
        """client id → node id once `enough` of the wanted clients are online (owners may
        join late or be restarting), or whoever is online after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.nodes_by_client()
            if len(wanted & nodes.keys()) >= enough or time.monotonic() >= deadline:
                return nodes
            time.sleep(1.0)

    def _nodes_by_key(self) -> dict[int, int]:
        """client id → node id of the online nodes, by the public key they authenticate
        with (a node whose key is not on the roster is ignored)."""
        mapping = {}
        for node in online_nodes(self.run.grid):
            try:
                numbers = load_public_key(node.public_key, "node").public_numbers()
            except DeployError:
                continue
            if numbers in self.roster:
                mapping[self.roster.index(numbers)] = node.node_id
        return mapping


@dataclass
class CoordinatorSide:
    """What the coordinator holds for a run: the model with its adapter (x, evaluated on
    the coordinator's own held-out files), the header every task carries."""

    model: torch.nn.Module
    held_out: HeldOutSet
    header: wire.RunHeader

    @classmethod
    def prepare(cls, cfg: RunConfig) -> CoordinatorSide:
        """A deployment's coordinator: it evaluates on its own held-out files."""
        parts = assemble(cfg, heldout_files, cfg.train.threads)
        return cls.of(cfg, parts.model, parts.data)

    @classmethod
    def of(cls, cfg: RunConfig, model: torch.nn.Module, held_out: HeldOutSet) -> CoordinatorSide:
        return cls(model, held_out, run_header(cfg, model))

    def run_rounds(
        self, cfg: RunConfig, run: ServerRun, done: int, show_progress: bool, nodes_by_client=None
    ) -> Path:
        """The rounds over `run`'s Grid (RoundLoop, as the simulation runs them); the run
        is finished on Flower's side either way. `nodes_by_client`: as FlowerRunner's."""
        loop = RoundLoop(
            cfg,
            self.model,
            FlowerRunner(cfg, self.model, run, self.header, nodes_by_client),
            num_clients=cfg.partition.num_clients,  # == len(deploy.clients) in a deployment
            train_cfgs={"sft": cfg.train, "dpo": cfg.train},
            base_originals={},  # exact aggregation is refused: no residual to fold
            held_out=self.held_out,
            min_replies=cfg.deploy.min_replies,
            show_progress=show_progress,
        )
        try:
            final = loop.run(done)
        except BaseException as err:
            run.finish(False, type(err).__name__)
            raise
        run.finish(True, "")
        return final


def coordinate(cfg: RunConfig, resume: bool = False, show_progress: bool = True) -> Path:
    """Run the configured federation across machines; the final round's directory."""
    rules.check(cfg, "coordinate")
    check_roster(cfg.deploy)
    done = completed_run(cfg, resume)
    if finished(cfg, done):
        return round_dir(Path(cfg.output_dir), cfg.federation.rounds)
    side = CoordinatorSide.prepare(cfg)
    with federation(cfg, side.header) as run:
        return side.run_rounds(cfg, run, done, show_progress)


@contextmanager
def federation(cfg: RunConfig, header: wire.RunHeader) -> Iterator[ServerRun]:
    """Flower's side of the run: the SuperLink on loopback (its database, secret and logs
    under <output_dir>/federation), the fleet front on deploy.fleet_address, the roster's
    keys registered, the run created and acquired; all stopped on exit."""
    certs = _certs(cfg)
    directory = Path(cfg.output_dir) / "federation"
    directory.mkdir(parents=True, exist_ok=True)
    secret_file = ensure_secret(directory / "superexec.secret")
    flwr_home = directory / "flwr"
    link = SuperLink(directory, free_port(), certs, not cfg.deploy.insecure, secret_file)
    host, port = cfg.deploy.fleet_address.rsplit(":", 1)
    ca = None if certs is None else certs[0]
    front = FleetFront(host, int(port), link.address, ca, *(certs or (None, None, None))[1:])
    with link, front:
        write_connection(flwr_home, CONNECTION, link.address, ca, cfg.deploy.insecure)
        for k, key in enumerate(cfg.deploy.clients):
            register_node(flwr_home, CONNECTION, Path(key), f"client-{k}")
        submit_run(flwr_home, APP_DIR, CONNECTION, {"config-sha256": header.config_sha256})
        run = acquire_server_run(
            link.address, secret_file.read_bytes(), None if ca is None else ca.read_bytes()
        )
        console.print(
            f"coordinator: fleet front on {escape(cfg.deploy.fleet_address)}, run {run.run_id}"
        )
        yield run


def _certs(cfg: RunConfig):
    """(ca.pem, server.pem, server.key) from deploy.certs_dir, or None with --insecure."""
    if cfg.deploy.insecure:
        console.print(
            "[bold red]warning[/]: deploy.insecure: adapters cross the network in plaintext "
            "and nodes are not authenticated (any node that reaches the port can join)"
        )
        return None
    directory = Path(cfg.deploy.certs_dir)
    paths = tuple(directory / name for name in ("ca.pem", "server.pem", "server.key"))
    for path in paths:
        if not path.is_file():
            raise ConfigError(
                f"deploy.certs_dir: {path} is missing (make it with `fedit certs ca`)"
            )
    return paths
