"""fedit's rounds under Flower's simulation runtime (Ray backend): many clients on one box
(`fedit simulate-ray`, docs/design/deployment.md §2.12).

The same two sides as a deployment, on one machine. The ServerApp is the coordinator's:
``CoordinatorSide.run_rounds`` (fedit's RoundLoop over a FlowerRunner) on the runtime's
Grid, so tasks and replies are the deployment's messages, encoded, decoded and checked the
same way (fedit.protocol.wire). The ClientApp is a data owner's: ``DataOwner.handle`` with a
session that holds every client's records, prepared and partitioned the way the
simulation prepares them (fedit.engine.federation_data.prepare_data), so any Ray worker
can train any client the task names. Each worker process loads the base model once and
keeps it in a module-level cache between messages (a Ray actor is one long-lived process,
and the ClientApp's handler is unpickled by reference to this module, so the cache
survives); each worker records its load count in
``<output_dir>/federation/workers/<pid>.json``.

The runtime is driven in this process with ``flwr.simulation.run_simulation``: the very
``_run_simulation`` that ``flwr run`` reaches through a SuperLink and ``flwr-simulation``,
minus the detached SuperLink on fixed ports and the FAB installed into a fresh environment.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import threading
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedit.config import ConfigError, RunConfig, rules, to_toml
from fedit.deploy.coordinator import CoordinatorSide
from fedit.deploy.flower.flower_io import reply_for
from fedit.deploy.owner import DataOwner, RunSession
from fedit.engine.assembly import assemble, federation_heldout, in_process_clients
from fedit.engine.checkpoint import round_dir
from fedit.engine.federation_data import prepare_data
from fedit.engine.rounds import completed_run, finished
from fedit.errors import RunStopped, write_atomic
from fedit.protocol import wire
from fedit.protocol.traffic import run_header

console = Console(stderr=True)
log = logging.getLogger("fedit.simulate_ray")
FEDERATION_DIR = "federation"  # beside the rounds, as a deployment's coordinator keeps it
WORKERS_DIR = "workers"  # <pid>.json per Ray worker: its model loads and messages served
STATE_DIR = "state"  # the owners' per-client state (SCAFFOLD c_k, DPO references)
# Ray refuses an object store under 75 MiB; a LoRA adapter of a small model is a few MiB
MIN_OBJECT_STORE_MB = 80
# Ray on Linux binds its servers (GCS, raylet, every worker) on all interfaces under the
# machine's address; with this variable at 0 it runs as on macOS and Windows, one machine
# and no cluster, every server on 127.0.0.1 (ray/_private/ray_constants.py
# ENABLE_RAY_CLUSTER, services.get_node_ip_address). Read when ray is imported, and by each
# Ray process from the environment it inherits.
RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# How F/simulation/run_simulation.py _main_loop reports that the runtime itself failed (e.g.
# Ray did not start); the ServerApp's own exceptions reach us unwrapped. A worker that dies
# mid-message is not this: F/server/superlink/fleet/vce/vce_api.py worker answers with an
# Error reply, and the round lists the client as dropped (deploy.min_replies decides).
RUNTIME_FAILED = "An error was encountered. Ending simulation."


@dataclass(frozen=True)
class RayResources:
    """What the Ray backend gets: `workers` actors (clients trained at once), each with
    `cpus_per_client` CPUs and `gpus_per_client` of a GPU (0.25: four clients share one)."""

    workers: int = 2
    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    object_store_mb: int | None = None  # Ray's default: 30% of the machine's memory

    def check(self) -> RayResources:
        if self.workers < 1:
            raise ConfigError("--workers: must be >= 1")
        if self.cpus_per_client <= 0:
            raise ConfigError("--cpus-per-client: must be > 0")
        if self.gpus_per_client < 0:
            raise ConfigError("--gpus-per-client: must be >= 0")
        if self.object_store_mb is not None and self.object_store_mb < MIN_OBJECT_STORE_MB:
            raise ConfigError(f"--object-store-mb: Ray needs at least {MIN_OBJECT_STORE_MB}")
        if self.gpus_per_client > 0 and torch.cuda.device_count() == 0:
            raise ConfigError("--gpus-per-client: no GPU is visible on this machine")
        return self

    def backend_config(self) -> dict[str, Any]:
        """Flower's backend config (F/server/superlink/fleet/vce/backend/raybackend.py):
        ray.init arguments and each actor's resources. The pool holds as many actors as
        fit: num_cpus / cpus_per_client, and num_gpus / gpus_per_client with GPUs."""
        init: dict[str, Any] = {
            "num_cpus": self.workers * self.cpus_per_client,
            "include_dashboard": False,
            "address": "local",  # a cluster of our own, never one another process started
        }
        if self.object_store_mb is not None:
            init["object_store_memory"] = self.object_store_mb * 1024 * 1024
        return {
            "init_args": init,
            "client_resources": {
                "num_cpus": self.cpus_per_client,
                "num_gpus": self.gpus_per_client,
            },
        }

    @property
    def threads(self) -> int:
        """torch threads per worker: its CPUs."""
        return max(1, int(self.cpus_per_client))


def simulate_ray(
    cfg: RunConfig, resources: RayResources, resume: bool = False, show_progress: bool = True
) -> Path:
    """Run the configured federation under Flower's simulation runtime; the final round's
    directory (the same run directory `fedit train` writes)."""
    rules.check(cfg, "simulate-ray")
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(
            "fedit simulate-ray needs Ray: pip install 'fedit[ray]' (flwr[simulation])"
        )
    resources.check()
    done = completed_run(cfg, resume)
    if finished(cfg, done):
        return round_dir(Path(cfg.output_dir), cfg.federation.rounds)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    side, num_clients = _coordinator_side(cfg)
    workers = Path(cfg.output_dir) / FEDERATION_DIR / WORKERS_DIR
    for stale in workers.glob("*.json"):  # an earlier attempt's workers
        stale.unlink()
    server = _Server(cfg, side, done, num_clients, show_progress)
    client_app = ClientApp()
    client_app.train()(ClientSide(cfg, resources.threads))
    console.print(
        f"[bold]fedit[/] simulate-ray: {num_clients} clients on {resources.workers} Ray "
        f"worker(s), {resources.cpus_per_client:g} CPU / {resources.gpus_per_client:g} GPU each"
    )
    os.environ[RAY_CLUSTER_ENV] = "0"  # before ray is imported (flwr imports it lazily)
    from flwr.simulation import run_simulation

    with _quiet_flower():
        try:
            run_simulation(
                server.app,
                client_app,
                num_supernodes=num_clients,
                backend_name="ray",
                backend_config=resources.backend_config(),
            )
        except RuntimeError as err:
            if not str(err).startswith(RUNTIME_FAILED):
                raise
            raise RuntimeStoppedError(f"Flower's simulation runtime failed: {_cause(err)}") from err
        finally:
            server.runtime_stopped.set()  # a ServerApp still waiting on the Grid stops
    if server.final is None:  # the ServerApp raised: run_simulation re-raised it already
        raise RunStopped("the simulation runtime ended before the rounds did")
    _report_workers(workers)
    return server.final


def _cause(err: BaseException) -> str:
    """The first exception of a chain (Ray's, under Flower's wrappers), as one line."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _coordinator_side(cfg: RunConfig) -> tuple[CoordinatorSide, int]:
    """The coordinator's model and held-out sets, as the simulation prepares them."""
    parts = assemble(cfg, prepare_data)
    side = CoordinatorSide.of(cfg, parts.model, federation_heldout(parts.data, parts.pad_id))
    return side, parts.data.num_clients


class _Server:
    """The ServerApp: the coordinator's rounds on the runtime's Grid."""

    def __init__(
        self,
        cfg: RunConfig,
        side: CoordinatorSide,
        done: list[int],
        num_clients: int,
        show_progress: bool,
    ) -> None:
        self.cfg, self.side, self.done = cfg, side, done
        self.num_clients, self.show_progress = num_clients, show_progress
        self.final: Path | None = None
        self.runtime_stopped = threading.Event()
        self.app = ServerApp()
        self.app.main()(self.main)

    def main(self, grid: Grid, context: Context) -> None:
        run = _SimulatedRun(_StoppableGrid(grid, self.runtime_stopped))
        nodes = _NodesInOrder(run.grid, self.num_clients)
        self.final = self.side.run_rounds(self.cfg, run, self.done, self.show_progress, nodes)


class RuntimeStoppedError(RunStopped):
    """Flower's simulation runtime failed (e.g. Ray did not start) or stopped before the
    rounds were done."""


@dataclass
class _StoppableGrid:
    """The runtime's Grid, refusing every call once the runtime has stopped: the ServerApp
    thread would otherwise wait out deploy.join_timeout / round_timeout for workers that
    are gone, and the process could not exit."""

    grid: Grid
    stopped: threading.Event

    def _check(self) -> None:
        if self.stopped.is_set():
            raise RuntimeStoppedError("the simulation runtime stopped; no worker is left")

    def get_node_ids(self) -> Iterable[int]:
        self._check()
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._check()
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._check()
        return self.grid.pull_messages(message_ids)


@dataclass
class _SimulatedRun:
    """What CoordinatorSide.run_rounds needs of a run: its grid; Flower ends the
    simulation's run itself when the ServerApp returns."""

    grid: Any

    def finish(self, ok: bool, reason: str) -> None:
        pass


@dataclass
class _NodesInOrder:
    """client id → node id under the simulation runtime: client k is the k-th smallest
    node id, once the runtime has registered all its nodes (one per client).

    Not Flower's node_config "partition-id": that reaches only the ClientApp's Context,
    the Grid shows node ids alone (and random bytes for public keys,
    F/server/superlink/fleet/vce/vce_api.py _register_nodes). Which node carries client k
    does not change what is trained: every worker holds every client's records, and the
    task names the client, its seed and its learning rate."""

    grid: Any
    num_clients: int

    def __call__(self) -> dict[int, int]:
        ids = sorted(self.grid.get_node_ids())
        return dict(enumerate(ids)) if len(ids) == self.num_clients else {}


@contextmanager
def _quiet_flower() -> Iterator[None]:
    """Silence two notices that do not apply here: run_simulation's deprecation (fedit
    calls what `flwr run` calls underneath) and Ray's note that a future version will stop
    hiding GPUs from actors given none (2.55, the version flwr 1.42 pins, hides them)."""
    logger, drop = logging.getLogger("flwr"), _DropDeprecation()
    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*accelerator visible devices", FutureWarning)
            yield
    finally:
        logger.removeFilter(drop)


class _DropDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def _report_workers(directory: Path) -> None:
    """One line on the Ray workers: how many served, base model loads per worker."""
    records = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]
    loads = sorted(r["model_loads"] for r in records)
    messages = sum(r["messages"] for r in records)
    console.print(
        f"Ray workers: {len(records)} served {messages} client rounds; base model loads "
        f"per worker: {loads}"
    )


# ---- the ClientApp's side, in each Ray worker ----

# This worker's owners, by the sha256 of the run config (one run at a time): built on the
# first message, kept for the process's life, so the model is loaded once per worker.
_WORKER: dict[str, RuntimeOwners] = {}


@dataclass(frozen=True)
class ClientSide:
    """The ClientApp's train handler. Ray pickles it with every message: the run's config
    travels by value, the code (and the _WORKER cache) by reference to this module."""

    cfg: RunConfig
    threads: int
    config_sha256: str = field(init=False)

    def __post_init__(self) -> None:
        text = to_toml(self.cfg.to_dict())
        object.__setattr__(self, "config_sha256", hashlib.sha256(text.encode()).hexdigest())

    def __call__(self, message: Message, context: Context) -> Message:
        owners = _WORKER.get(self.config_sha256)
        if owners is None:
            _WORKER.clear()  # release another run's model first
            owners = _WORKER[self.config_sha256] = RuntimeOwners(self.cfg, self.threads)
        reply, _outcome = reply_for(message, owners.handle)
        owners.messages += 1
        owners.record()
        return reply


class RuntimeOwners:
    """Every client's data owner on this worker: a DataOwner (a deployed owner's task
    handling, built by its constructor) whose sessions hold all clients' records (the
    simulation's preparation of the run's data), their per-client state kept under
    <output_dir>/federation/state/, shared by the workers on this box."""

    def __init__(self, cfg: RunConfig, threads: int) -> None:
        self.owner = DataOwner(WorkerSessions(cfg, threads))
        self.messages = 0
        self.record_path = (
            Path(cfg.output_dir) / FEDERATION_DIR / WORKERS_DIR / f"{os.getpid()}.json"
        )

    def handle(self, message: Message) -> RecordDict:
        return self.owner.handle(message)

    @property
    def model_loads(self) -> int:
        return self.owner.model_loads

    def record(self) -> None:
        """This worker's counts, for the driver's report (and the tests)."""
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        counts = {"pid": os.getpid(), "model_loads": self.model_loads, "messages": self.messages}
        write_atomic(self.record_path, json.dumps(counts))


class WorkerSessions:
    """A Ray worker's session: its one run's, built on the first task (the model loaded
    once). A task of another config is refused: this worker's records are prepared for
    its own."""

    def __init__(self, cfg: RunConfig, threads: int) -> None:
        self.cfg, self.threads = cfg, threads
        self.session: RunSession | None = None
        self.model_loads = 0

    def session_for(self, header: wire.RunHeader) -> RunSession:
        if self.session is None:
            _quiet_worker()
            state_dir = Path(self.cfg.output_dir) / FEDERATION_DIR / STATE_DIR
            self.session = worker_session(self.cfg, state_dir, self.threads)
            self.model_loads += 1
            log.info("worker %d: base model loads: %d", os.getpid(), self.model_loads)
        if header.config_sha256 != self.session.header.config_sha256:
            raise wire.WireError("run.config_sha256: not the config this worker prepared")
        return self.session


def _quiet_worker() -> None:
    """A worker's output reaches the driver's terminal: no per-load progress bars or
    library deprecation notices there either (the CLI quietens its own process the same
    way, fedit.cli.common.quiet_libraries)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def worker_session(cfg: RunConfig, state_dir: Path, threads: int) -> RunSession:
    """The run's model and every client's LocalClient on this worker. The data is the
    simulation's (prepare_data of the run config), not an owner's files; the clients keep
    their own state where the simulation's do (in the run directory)."""
    parts = assemble(cfg, prepare_data, threads)
    header = run_header(cfg, parts.model)
    clients = in_process_clients(cfg, parts.data, parts.pad_id)
    state_root = state_dir / header.config_sha256[:12]
    return RunSession(cfg, header, state_root, parts, header.base_fingerprint, clients)
