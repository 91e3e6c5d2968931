"""A data owner's side of a deployment (`fedit join`): its records, its model, its rounds.

The owner process reads and validates its own records at start, then serves the rounds its
SuperNode receives (fedit.deploy.flower.flower_io.serve_client_tasks) from this one process, so
the base model is loaded once per run and stays resident. Each round's message is checked
like any peer's input (fedit.protocol.wire): a task for another base model, a config that does
not validate or tensors of the wrong shape are refused with a reason and never trained on.
Training is fedit.client.session.LocalClient's, the very code the simulation runs, and the
reply holds the adapter, the record count and scalar metrics only.

SCAFFOLD's c_k lives on the owner (``OwnerState``): the coordinator names the version it
holds by its sha256 and sends the tensors only when the owner lacks them (a new disk), so
the per-client state stays on the owner's machine across rounds and restarts. So do the
error-feedback memories of compressed uploads (fedit.client.feedback), which never
leave it at all, and local DP's releases (fedit.client.releases): a round asked for again,
after a restart too, gets the release already made, and the owner logs the ε of the
releases it counted itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from flwr.app import Message, RecordDict
from safetensors.torch import load_file, save_file

from fedit.client.precision import half_precision_frozen_weights
from fedit.client.session import LocalClient
from fedit.config import ConfigError, RunConfig, config_from_toml
from fedit.data.preferences import PreferencePair, read_preferences
from fedit.data.readers import read_records
from fedit.data.records import Record
from fedit.deploy.secagg import stages
from fedit.deploy.secagg.owner import SecureOwner
from fedit.engine.assembly import (
    RunParts,
    assemble,
    fix_references,
    local_clients,
    reference_at_start,
)
from fedit.engine.federation_data import tokenize_owner_data
from fedit.engine.run_dir import INPUTS, input_changes
from fedit.errors import write_atomic
from fedit.fingerprint import content_hash
from fedit.models.adapters import get_adapter_state
from fedit.models.loading import base_fingerprint
from fedit.ops.aggregation import add_scaled, zeros_like
from fedit.ops.ranks import client_ranks
from fedit.ops.sharing import shared_part, with_zero_kept
from fedit.protocol import wire
from fedit.protocol.traffic import REFERENCE_GROUP, reply_content
from fedit.types import AdapterState, ClientTask, ClientUpdate, Rejection

log = logging.getLogger("fedit.join")
KEPT_VERSIONS = 2  # c_k files per client: the newest, and the one before (a lost reply)
REFERENCE_FILE = "dpo_reference.safetensors"  # its pairs' π_ref log-probs: never sent


@dataclass(frozen=True)
class OwnerInputs:
    """What a data owner brings: its own files, and nothing from anyone else."""

    data: Path | None  # instruction records (SFT rounds)
    preference_data: Path | None  # preference pairs (DPO rounds)
    model: str | None  # the base model here, when the run's model path is not valid here
    state_dir: Path  # per-client state (SCAFFOLD c_k, error feedback), kept across restarts
    fields: str = "dolly"  # how this owner's records file names its fields (data.fields)
    preference_format: str = "auto"  # its pairs' format (data.preference_format)
    threads: int | None = None
    # refuse every run whose config does not enable secure aggregation (so a coordinator
    # cannot switch it off and receive this owner's update in plaintext)
    secure_only: bool = False


class OwnerState:
    """This owner's per-client state, one content-addressed safetensors file per version
    under `directory` (the coordinator names the version it expects by its sha256)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def get(self, digest: str, like: AdapterState) -> AdapterState | None:
        """The state whose digest is `digest` (zeros, the state of a client not yet seen,
        need no file), or None when this owner does not hold it."""
        zeros = zeros_like(like)
        if digest == wire.state_digest(zeros):
            return zeros
        path = self.directory / f"{digest}.safetensors"
        if not path.is_file():
            return None
        state = load_file(path)
        return state if wire.state_digest(state) == digest else None  # a damaged file

    def put(self, state: AdapterState) -> str:
        """Save a new version; keep the KEPT_VERSIONS newest. Its digest."""
        self.directory.mkdir(parents=True, exist_ok=True)
        digest = wire.state_digest(state)
        staging = self.directory / f".tmp-{digest}.safetensors"
        save_file(state, staging)
        staging.replace(self.directory / f"{digest}.safetensors")
        versions = sorted(self.directory.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
        for old in versions[:-KEPT_VERSIONS]:
            old.unlink(missing_ok=True)
        return digest


class RunSession:
    """What an owner holds for one run: the run's config, the base model with its adapter
    (and the starting adapter, a fixed π_ref's), and its clients. A deployed owner's
    (``joining``) is one client, its records tokenised once the first task names its id; a
    Ray worker's (fedit.deploy.simulation_runtime) holds every client, prepared as the
    simulation prepares them. Both are built by this constructor."""

    def __init__(
        self,
        cfg: RunConfig,
        header: wire.RunHeader,
        state_root: Path,
        parts: RunParts,
        fingerprint: str,
        clients: list[LocalClient],
        own_data: tuple[Sequence[Record], Sequence[PreferencePair]] | None = None,
    ) -> None:
        self.cfg, self.header, self.state_root = cfg, header, state_root
        self.tokenizer, self.model, self.pad_id = parts.tokenizer, parts.model, parts.pad_id
        self.fingerprint = fingerprint  # of the base model as loaded here
        self.start_adapter = {k: v.clone() for k, v in get_adapter_state(self.model).items()}
        self.shapes = wire.shapes_of(self.start_adapter)
        self.ranks = client_ranks(cfg, cfg.partition.num_clients)  # mixed LoRA ranks, or None
        self.clients = {client.client_id: client for client in clients}
        self.own_data = own_data  # a deployed owner's records and pairs, not yet tokenised

    @classmethod
    def joining(
        cls,
        inputs: OwnerInputs,
        header: wire.RunHeader,
        records: Sequence[Record],
        pairs: Sequence[PreferencePair],
        fingerprints: dict[str, dict[str, str]],
    ) -> RunSession:
        """A deployed owner's session of the run `header` names, with its own files."""
        cfg = owner_config(header.config_toml, inputs)
        state_root = inputs.state_dir / header.config_sha256[:12]
        check_own_inputs(state_root, fingerprints)  # before the model: a refusal is cheap
        parts = assemble(cfg, threads=inputs.threads)
        fingerprint = base_fingerprint(parts.model)
        return cls(cfg, header, state_root, parts, fingerprint, [], (records, pairs))

    def client_for(self, client_id: int) -> LocalClient:
        # partition.num_clients is the roster's size (fedit.deploy.coordinator checks)
        n = self.cfg.partition.num_clients
        if not 0 <= client_id < n:
            raise wire.WireError(f"round.client_id: {client_id}, the run has {n} clients")
        if self.own_data is not None and not self.clients:
            # Tokenised once the first task names this owner's id: a data attack needs it.
            examples, pairs = tokenize_owner_data(
                self.cfg, self.tokenizer, *self.own_data, client_id
            )
            data = [(client_id, examples, pairs)]
            [client] = local_clients(self.cfg, n, self.pad_id, self.state_root, data)
            self.clients[client_id] = client
        if client_id not in self.clients:
            only = next(iter(self.clients))
            raise wire.WireError(f"round.client_id: {client_id}, but this owner is client {only}")
        return self.clients[client_id]

    def fix_reference(
        self,
        client: LocalClient,
        task: ClientTask,
        global_state: AdapterState,
        sent: AdapterState | None,
        directory: Path,
    ) -> bool:
        """Give `client` its fixed DPO π_ref log-probs before a DPO round, as the simulation
        does (fedit.engine.simulation.InProcessRunner); False when this owner cannot:
        dpo.reference = "sft" after its first DPO round, on an owner that lost the file and
        was not `sent` the SFT-end adapter.

        "base" (and "sft" of a run without SFT rounds: the starting model, W0) come from the
        model under its starting adapter (a Ray worker may have trained other clients since
        it loaded the model); "sft" from the global adapter of the first DPO round (the
        SFT-end model), kept in `directory` so a restarted owner has it."""
        dpo, model, train_cfg = self.cfg.dpo, self.model, self.cfg.train
        if client.reference is not None or dpo.reference == "round_start":
            return True
        if reference_at_start(dpo):
            fix_references([client], model, train_cfg, self.start_adapter)
            return True
        path = directory / REFERENCE_FILE
        if path.is_file():
            reference = load_file(path).get("logps")
            if reference is not None and reference.shape == (len(client.pairs), 2):
                client.reference = reference
                return True
        start = global_state if task.round_number == dpo.sft_rounds + 1 else sent
        if start is None:
            return False
        fix_references([client], model, train_cfg, start)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"logps": client.reference}, directory / f".tmp-{REFERENCE_FILE}")
        (directory / f".tmp-{REFERENCE_FILE}").replace(path)
        return True


def own_fingerprints(inputs: OwnerInputs) -> dict[str, dict[str, str]]:
    """{flag: {file: content fingerprint}} of this owner's --data and --preference-data."""
    files = {"--data": inputs.data, "--preference-data": inputs.preference_data}
    return {
        flag: {} if path is None else {str(path): content_hash(path)}
        for flag, path in files.items()
    }


def check_own_inputs(state_root: Path, fingerprints: dict[str, dict[str, str]]) -> None:
    """Record this owner's data fingerprints at its first task of a run (in the run's state
    dir), and refuse the run's tasks once its files changed: a restarted owner would train
    its client on other records from then on, beside state (c_k, DPO reference log-probs)
    computed from the old ones."""
    path = state_root / INPUTS
    if not path.is_file():
        state_root.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(fingerprints, indent=1))
        return
    changes = input_changes(json.loads(path.read_text()), fingerprints)
    if changes:
        raise ConfigError(
            f"this owner's {'; '.join(changes)}: its client cannot continue the run on other "
            f"records; restore the file, or remove {state_root} to join the run afresh"
        )


def owner_config(config_toml: str, inputs: OwnerInputs) -> RunConfig:
    """The run's config with this owner's own files (and how they are laid out) in place of
    the coordinator's blanks."""
    overrides = [
        f'data.path="{_toml_path(inputs.data)}"',
        f'data.preference_path="{_toml_path(inputs.preference_data)}"',
        f'data.fields="{_toml_path(inputs.fields)}"',
        f'data.preference_format="{_toml_path(inputs.preference_format)}"',
    ]
    if inputs.model:
        overrides.append(f'model.name_or_path="{_toml_path(inputs.model)}"')
    return config_from_toml(config_toml, "the coordinator's run config", overrides)


def _toml_path(path: Path | str | None) -> str:
    return "" if path is None else str(path).replace("\\", "\\\\").replace('"', '\\"')


class Sessions(Protocol):
    """Where a DataOwner's run sessions come from: ``session_for`` gives the session of the
    run a task's header names (loading the base model when it has none for that run)."""

    session: RunSession | None
    model_loads: int

    def session_for(self, header: wire.RunHeader) -> RunSession: ...


class OwnerFiles:
    """A deployed owner's sessions: from its own files, read and validated at start, one run
    at a time (a task of another run's config replaces the session)."""

    def __init__(self, inputs: OwnerInputs) -> None:
        if inputs.data is None and inputs.preference_data is None:
            raise ConfigError("a data owner needs --data (records) or --preference-data")
        self.inputs = inputs
        # Read and validated now, so a bad file is reported before joining anything.
        self.records: list[Record] = (
            read_records(str(inputs.data), inputs.fields) if inputs.data else []
        )
        self.pairs: list[PreferencePair] = (
            read_preferences(str(inputs.preference_data), inputs.preference_format)
            if inputs.preference_data
            else []
        )
        self.fingerprints = own_fingerprints(inputs)  # of the files as just read
        self.session: RunSession | None = None
        self.model_loads = 0

    def session_for(self, header: wire.RunHeader) -> RunSession:
        """The run's session, built (and the model loaded) on the run's first task."""
        session = self.session
        if session is None or session.header.config_sha256 != header.config_sha256:
            self.session = session = None  # release the old run's model first
            session = RunSession.joining(
                self.inputs, header, self.records, self.pairs, self.fingerprints
            )
            self.model_loads += 1
            log.info("base model loads: %d", self.model_loads)
            self.session = session
        return session


class DataOwner:
    """Serves a data owner's rounds; ``handle`` is the executor's message handler. Its
    sessions are a deployed owner's own files (``joining``), or a Ray worker's preparation
    of every client (fedit.deploy.simulation_runtime, which holds a DataOwner: both are
    built by this constructor)."""

    def __init__(self, sessions: Sessions, secure_only: bool = False) -> None:
        self.sessions = sessions
        # refuse every run whose config does not enable secure aggregation (OwnerInputs)
        self.secure_only = secure_only
        self.secure = SecureOwner(self)  # secure aggregation's per-round secrets
        self.rounds_trained = 0

    @classmethod
    def joining(cls, inputs: OwnerInputs) -> DataOwner:
        """The owner `fedit join` serves: its own files."""
        return cls(OwnerFiles(inputs), inputs.secure_only)

    @property
    def session(self) -> RunSession | None:
        return self.sessions.session

    @property
    def model_loads(self) -> int:
        return self.sessions.model_loads

    def handle(self, message: Message) -> RecordDict:
        """One round, or one stage of a secure round (fedit.deploy.secagg.owner): check the
        task, train, reply (a refusal is a status reply)."""
        if message.metadata.message_type in stages.STAGES:
            return self.secure.handle(message.metadata.message_type, message.content)
        answer = self.train(message.content, secure=False)
        if isinstance(answer, RecordDict):
            return answer
        session = self.session  # train's, once it decoded the task
        if isinstance(answer, Rejection) or session is None:
            return reply_content(answer)
        rank = None if session.ranks is None else session.ranks[answer.client_id]
        return reply_content(answer, rank, session.cfg.lora.shared)

    def train(self, content: RecordDict, secure: bool) -> ClientUpdate | Rejection | RecordDict:
        """A round's task checked and trained: the update, a Rejection (non-finite), or the
        status reply of a task not trained. `secure`: the task came as secure aggregation's
        masked-input stage, which a run with secagg.enabled accepts only (and the reverse),
        so a coordinator cannot ask for a plaintext update of a run that promised a sum."""
        try:
            session = self.session_for(wire.decode_header(content))
            if self.secure_only and not session.cfg.secagg.enabled:
                raise wire.WireError(
                    "secagg.enabled: this owner joined with --secure-aggregation-only and "
                    "the run does not enable it"
                )
            if session.cfg.secagg.enabled != secure:
                raise wire.WireError(
                    "secagg.enabled: this run's config "
                    + ("enables" if session.cfg.secagg.enabled else "does not enable")
                    + " secure aggregation, the task says otherwise"
                )
            shared = session.cfg.lora.shared
            task, global_state, held = wire.decode_task(
                content, shared_part(session.shapes, shared), session.ranks
            )
            global_state = with_zero_kept(global_state, session.shapes, shared)
            client = session.client_for(task.client_id)
            state = OwnerState(session.state_root / f"client_{task.client_id}")
            missing = self._restore_held(task, held, state, global_state)
            if missing:
                return wire.encode_status("needs_c_k", f"this owner does not hold {missing}")
            sent_reference = task.instructions.tensors.pop(REFERENCE_GROUP, None)
            if task.objective == "dpo" and not session.fix_reference(
                client, task, global_state, sent_reference, state.directory / "dpo"
            ):
                return wire.encode_status(
                    "needs_reference", "this owner does not hold its dpo.reference = 'sft'"
                )
        except (wire.WireError, ConfigError) as err:
            log.warning("refused a task: %s", err)
            return wire.encode_status("refused", str(err))
        log.info("training round %d as client %d", task.round_number, task.client_id)
        train_cfg = session.cfg.train
        with half_precision_frozen_weights(  # as the simulation casts for its clients
            session.model, train_cfg.mixed_precision, train_cfg.half_precision_frozen_weights
        ):
            update = client.train(session.model, global_state, task, train_cfg)
        if isinstance(update, Rejection):
            return update
        if client.privacy is not None and client.releases is not None:
            # this owner's own count: what it released, whatever the coordinator reports
            made = len(client.releases.released())
            epsilon = client.privacy.epsilon(made)
            log.info(
                "local DP: %d release(s) made, ε %.3g at δ %.2g",
                made,
                epsilon,
                client.privacy.delta,
            )
        if "c_k" in task.instructions.tensors:  # SCAFFOLD: c_k⁺ = c_k + Δc_k, kept here
            delta = update.extras["control_delta"]
            state.put(add_scaled(task.instructions.tensors["c_k"], delta, 1.0))
        self.rounds_trained += 1
        return update

    def session_for(self, header: wire.RunHeader) -> RunSession:
        """The run's session, refused when its base model is not the coordinator's."""
        session = self.sessions.session_for(header)
        if header.base_fingerprint != session.fingerprint:
            raise wire.WireError(
                "run.base_fingerprint: the coordinator's base model differs from this "
                "owner's (another model, dtype or quantisation)"
            )
        return session

    @staticmethod
    def _restore_held(task, held: dict[str, str], state: OwnerState, like) -> list[str]:
        """Put the per-client tensors the coordinator left out (it named them by digest)
        back into the task from this owner's own state; the names it does not hold."""
        missing = []
        for group, digest in held.items():
            tensors = state.get(digest, like)
            if tensors is None:
                missing.append(group)
            else:
                task.instructions.tensors[group] = tensors
        return missing
