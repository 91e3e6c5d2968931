"""Fixtures for the deploy tests: certificates, and a federation of real Flower processes.

Everything binds 127.0.0.1, on ports picked free; every FLWR_HOME, database and log lives
under pytest's tmp directories; every wait has a deadline. Each child process is started
through `Children`, which stops them all at teardown and asserts no process group is left.
Certificates and node keys are fedit's own (fedit.deploy.pki, as `fedit certs` makes them).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

pytest.importorskip("flwr", reason="the deploy tests need flwr (pip install 'flwr==1.42.*')")

import fedit
from fedit.data.readers import write_records_jsonl
from fedit.data.synthetic import generate_records
from fedit.deploy.flower import flwr_cli, processes
from fedit.deploy.flower.processes import Child, SuperLink, SuperNode
from fedit.deploy.pki import make_ca, make_node_key
from tests.conftest import tiny_run_overrides

if TYPE_CHECKING:
    from fedit.deploy.flower.flower_io import ServerRun

C = TypeVar("C", bound=Child)
T = TypeVar("T")
EXECUTOR = Path(__file__).with_name("node_executor.py")
FEDIT_SRC = str(Path(fedit.__file__).resolve().parents[1])  # this checkout's fedit


# ---- certificates (fedit certs) ----


@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that did not sign the server certificate
    directory: Path

    @property
    def server(self) -> tuple[Path, Path, Path]:
        return self.ca, self.cert, self.key

    def node(self, name: str) -> tuple[Path, Path]:
        """A node key pair as `fedit certs node-key` writes it: (<name>.key, <name>.pub)."""
        key, pub = make_node_key(self.directory / f"{name}.key", force=False)
        return key, pub


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    out = tmp_path_factory.mktemp("pki")
    ca, _, cert, key = make_ca(out, "localhost", [], force=False)
    other = out / "other"
    other.mkdir()
    other_ca = make_ca(other, "localhost", [], force=False)[0]
    return Pki(ca, cert, key, other_ca, out)


# ---- processes ----


class Children:
    """Every child a test module starts; `close` stops them all (last started first)."""

    def __init__(self) -> None:
        self.started: list[Child] = []
        self.timings: dict[str, float] = {}

    def add(self, child: C) -> C:
        self.started.append(child)
        return child

    def executor(
        self, directory: Path, runtime_address: str, delta: float, secret: Path | None = None
    ) -> Executor:
        report = directory / "executor.jsonl"
        argv = [sys.executable, str(EXECUTOR), runtime_address, str(delta), str(report)]
        child = Child(
            f"executor {directory.name}",
            argv + ([str(secret)] if secret else []),
            directory / "executor.log",
            {**os.environ, "PYTHONPATH": FEDIT_SRC, "OMP_NUM_THREADS": "1"},
        )
        self.add(child).spawn()
        return Executor(child, report, delta)

    def close(self) -> None:
        for child in reversed(self.started):
            child.stop()
        left = [c.name for c in self.started if c.pid is not None and group_alive(c.pid)]
        assert left == [], f"process groups left running: {left}"


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Executor:
    child: Child
    report: Path
    delta: float

    def events(self, kind: str) -> list[dict[str, object]]:
        import json

        if not self.report.exists():
            return []
        lines = self.report.read_text().splitlines()
        return [e for e in map(json.loads, lines) if e["event"] == kind]

    def wait_event(self, kind: str, timeout: float = 60.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while not (found := self.events(kind)):
            assert self.child.exit_code() is None, (
                f"{self.child.name} exited: {self.child.log_path}"
            )
            assert time.monotonic() < deadline, f"no '{kind}' from {self.child.name}"
            time.sleep(0.1)
        return found[-1]


@dataclass
class Owner:
    """A data owner of the tests: its SuperNode and its resident executor."""

    name: str
    node: SuperNode
    executor: Executor
    public_key: Path

    @property
    def node_id(self) -> int:
        assert self.node.node_id is not None
        return self.node.node_id


@dataclass
class Federation:
    link: SuperLink
    flwr_home: Path
    pki: Pki
    children: Children
    directory: Path
    owners: list[Owner] = field(default_factory=list)
    run: ServerRun = field(init=False)  # the run's ServerApp task, taken by this process

    def start_owner(
        self, name: str, delta: float, *, superlink: str | None = None, secret: bool = False
    ) -> Owner:
        """Register a new key, start its SuperNode (activated) and its executor; with
        `secret`, the two share a SuperExec secret (no other process can take the tasks)."""
        key, pub = self.pki.node(name)
        flwr_cli.register_node(self.flwr_home, "fedit", pub, name)
        directory = self.directory / name
        secret_file = processes.ensure_secret(directory / "superexec.secret") if secret else None
        node = SuperNode(
            directory,
            superlink or self.link.address,
            self.pki.ca,
            key,
            processes.free_port(),
            False,
            superexec_secret_file=secret_file,
        )
        self.children.add(node)
        timed(self.children, f"supernode {name} start (activated)", node.start)
        executor = self.children.executor(directory, node.runtime_address, delta, secret_file)
        owner = Owner(name, node, executor, pub)
        owner.executor.wait_event("ready")
        return owner


@pytest.fixture(scope="module")
def children() -> Iterator[Children]:
    kids = Children()
    try:
        yield kids
    finally:
        if kids.timings:
            print("\ndeploy timings (s):", {k: round(v, 2) for k, v in kids.timings.items()})
        kids.close()


@pytest.fixture(scope="module")
def federation(
    pki: Pki, children: Children, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Federation]:
    """A SuperLink with TLS, node auth and a SuperExec secret; three registered owners
    (deltas 1, 2, 4) with resident executors; a run created by `flwr run` and taken by
    this process (`federation.run`)."""
    from concurrent.futures import ThreadPoolExecutor

    from fedit.deploy.flower import flower_io

    directory = tmp_path_factory.mktemp("federation")
    secret = processes.ensure_secret(directory / "superexec.secret")
    link = SuperLink(directory / "link", processes.free_port(), pki.server, True, secret)
    children.add(link)
    timed(children, "superlink start", link.start)
    flwr_home = directory / "flwr-cli"
    flwr_cli.write_connection(flwr_home, "fedit", link.address, pki.ca, False)
    fed = Federation(link, flwr_home, pki, children, directory)
    with ThreadPoolExecutor(3) as pool:
        starts = [pool.submit(fed.start_owner, f"owner{k}", d) for k, d in enumerate([1, 2, 4])]
        fed.owners = [s.result() for s in starts]
    timed(
        children,
        "flwr run (submit)",
        lambda: flwr_cli.submit_run(flwr_home, flwr_cli.APP_DIR, "fedit", {"config-sha256": "t"}),
    )
    fed.run = timed(
        children,
        "acquire server run",
        lambda: flower_io.acquire_server_run(
            link.address, secret.read_bytes(), pki.ca.read_bytes()
        ),
    )
    try:
        yield fed
    finally:
        fed.run.finish(True, "")


def log_tails(children: list[Child], chars: int = 1500) -> str:
    """The end of each child's log, for an assertion's message: which process stalled."""
    return "\n".join(f"--- {c.name}:\n{c.log_text()[-chars:]}" for c in children)


def timed(children: Children, what: str, call: Callable[[], T]) -> T:
    started = time.monotonic()
    result = call()
    children.timings[what] = time.monotonic() - started
    return result


# ---- a federation's data and config (the tiny model) ----

ROUNDS = 2


def owner_files(directory: Path, owners: int = 3) -> tuple[list[Path], Path]:
    """The owners' record files (the 10 skills split between them: non-IID) and a held-out
    file."""
    records = generate_records(per_skill=6, seed=3)
    skills = sorted({r.category for r in records})
    heldout = [r for r in records if r.instruction.endswith("0")][:6] or records[:6]
    train = [r for r in records if r not in heldout]
    files = []
    for k in range(owners):
        mine = {s for i, s in enumerate(skills) if i % owners == k}
        path = directory / f"owner_{k}.jsonl"
        write_records_jsonl([r for r in train if r.category in mine], path)
        files.append(path)
    heldout_path = directory / "heldout.jsonl"
    write_records_jsonl(heldout, heldout_path)
    return files, heldout_path


def run_overrides(
    model_dir: Path, out: Path, data_dir: Path, heldout: Path, strategy: str, **extra: object
) -> list[str]:
    """Three owners' files as partition.method = "files", all three every round."""
    return tiny_run_overrides(
        model_dir,
        out,
        **{
            "data.path": str(data_dir / "owner_*.jsonl"),
            "data.heldout_path": str(heldout),
            "partition.method": "files",
            "partition.num_clients": 3,
            "federation.rounds": ROUNDS,
            "federation.clients_per_round": 3,
            "strategy.name": strategy,
            "train.threads": 1,
            **extra,
        },
    )


AUDITED = Path(__file__).with_name("audited.py")


def fedit_child(children: Children, name: str, log: Path, *args: str, **env: str) -> Child:
    """`python args...` with this checkout's fedit, one thread, started now."""
    environment = {
        **os.environ,
        "PYTHONPATH": f"{FEDIT_SRC}{os.pathsep}{FEDIT_SRC}/..",
        "OMP_NUM_THREADS": "1",
        **env,
    }
    child = Child(name, [sys.executable, *args], log, environment)
    children.add(child).spawn()
    return child


class Deployment:
    """A coordinator and three data owners as `fedit coordinate` / `fedit join` processes
    on 127.0.0.1, TLS and node authentication on, the tiny model; `overrides` the run
    config of the same federation (as a simulation, with output_dir `out`)."""

    def __init__(
        self,
        children: Children,
        pki: Pki,
        root: Path,
        model_dir: Path,
        strategy: str,
        **extra: object,
    ) -> None:
        self.children, self.pki, self.root = children, pki, root
        self.model_dir, self.strategy, self.extra = model_dir, strategy, extra
        self.files, self.heldout = owner_files(root)
        self.keys = [pki.node(f"{root.name}-owner{k}") for k in range(3)]
        self.certs = root / "certs"
        self.certs.mkdir()
        for source, name in ((pki.ca, "ca.pem"), (pki.cert, "server.pem"), (pki.key, "server.key")):
            (self.certs / name).write_bytes(source.read_bytes())
        self.front = f"127.0.0.1:{processes.free_port()}"
        self.out = root / "deployed"

    def overrides(self, out: Path, **deploy: object) -> list[str]:
        return run_overrides(
            self.model_dir, out, self.root, self.heldout, self.strategy, **self.extra, **deploy
        )

    def coordinator(self, *flags: str, round_timeout: float = 120, min_replies: int = 3) -> Child:
        """`fedit coordinate`, returned once its fleet front is up."""
        overrides = self.overrides(
            self.out,
            **{
                "deploy.clients": [str(pub) for _, pub in self.keys],
                "deploy.certs_dir": str(self.certs),
                "deploy.fleet_address": self.front,
                "deploy.round_timeout": round_timeout,
                "deploy.min_replies": min_replies,
            },
        )
        sets = [a for o in overrides for a in ("--set", o)]
        log = self.root / "coordinator.log"
        args = ("-m", "fedit.cli.main", "coordinate", "--quiet", *flags, *sets)
        child = fedit_child(self.children, "coordinator", log, *args)
        child.wait_for(r"fleet front on", 300)
        return child

    def owner(
        self, k: int, *flags: str, key: Path | None = None, name: str = "", **env: str
    ) -> Child:
        """`fedit join` for owner k's file with its key (or `key`), its state dir and log
        named by `name` (default k), every reply it sends recorded in root/audit_<name>.jsonl."""
        name = name or str(k)
        args = [
            str(AUDITED),
            str(self.root / f"audit_{name}.jsonl"),
            "join",
            *("--server", self.front, "--data", str(self.files[k])),
            *("--root-cert", str(self.pki.ca), "--key", str(key or self.keys[k][0])),
            *("--state-dir", str(self.root / f"state_{name}"), "--threads", "1", *flags),
        ]
        log = self.root / f"owner_{name}.log"
        return fedit_child(self.children, f"owner {name}", log, *args, **env)

    @staticmethod
    def wait_exit(child: Child, timeout: float = 600) -> int:
        """The child's exit code (`timeout` guards against a hang; it is no timing check)."""
        deadline = time.monotonic() + timeout
        while child.exit_code() is None:
            assert time.monotonic() < deadline, child.log_text()[-3000:]
            time.sleep(0.5)
        return child.exit_code()

    def metrics(self) -> list[dict]:
        lines = (self.out / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]
