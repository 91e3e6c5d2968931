"""Fixtures for the deploy tests: certificates, and a federation of real Flower processes.

Everything binds 127.0.0.1, on ports picked free; every FLWR_HOME, database and log lives
under pytest's tmp directories; every wait has a deadline. Each child process is started
through `Children`, which stops them all at teardown and asserts no process group is left.
The certificate code is a stand-in for fedit/deploy/pki.py (`fedit certs`): swap it in at
merge.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

pytest.importorskip("flwr", reason="the deploy tests need flwr (pip install 'flwr==1.42.*')")

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import fedit
from fedit.deploy import processes
from fedit.deploy.processes import Child, SuperLink, SuperNode

if TYPE_CHECKING:
    from fedit.deploy.flower_io import ServerRun

C = TypeVar("C", bound=Child)
T = TypeVar("T")
EXECUTOR = Path(__file__).with_name("node_executor.py")
FEDIT_SRC = str(Path(fedit.__file__).resolve().parents[1])  # this checkout's fedit


# ---- certificates (stand-in for fedit certs) ----


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(
    path: Path, key: ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat
) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    )
    path.chmod(0o600)


def make_ca(out: Path, label: str) -> tuple[Path, ec.EllipticCurvePrivateKey]:
    """A self-signed EC P-384 CA: out/<label>.pem."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(label))
        .issuer_name(_name(label))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA384())
    )
    path = out / f"{label}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key


def make_server_cert(
    out: Path, ca_key: ec.EllipticCurvePrivateKey, ca_label: str
) -> tuple[Path, Path]:
    """server.pem / server.key signed by the CA, naming localhost and 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(_name(ca_label))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    (out / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out / "server.key", key, serialization.PrivateFormat.PKCS8)
    return out / "server.pem", out / "server.key"


def make_node_key(out: Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 node key in OpenSSH format: <name>.key (private), <name>.pub."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write_key(out / f"{name}.key", key, serialization.PrivateFormat.OpenSSH)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    (out / f"{name}.pub").write_bytes(public)
    return out / f"{name}.key", out / f"{name}.pub"


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
        return make_node_key(self.directory, name)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    out = tmp_path_factory.mktemp("pki")
    ca, ca_key = make_ca(out, "ca")
    cert, key = make_server_cert(out, ca_key, "ca")
    other_ca, _ = make_ca(out, "other-ca")
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
        processes.register_node(self.flwr_home, "fedit", pub, name)
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

    from fedit.deploy import flower_io

    directory = tmp_path_factory.mktemp("federation")
    secret = processes.ensure_secret(directory / "superexec.secret")
    link = SuperLink(directory / "link", processes.free_port(), pki.server, True, secret)
    children.add(link)
    timed(children, "superlink start", link.start)
    flwr_home = directory / "flwr-cli"
    processes.write_connection(flwr_home, "fedit", link.address, pki.ca, False)
    fed = Federation(link, flwr_home, pki, children, directory)
    with ThreadPoolExecutor(3) as pool:
        starts = [pool.submit(fed.start_owner, f"owner{k}", d) for k, d in enumerate([1, 2, 4])]
        fed.owners = [s.result() for s in starts]
    timed(
        children,
        "flwr run (submit)",
        lambda: processes.submit_run(flwr_home, processes.APP_DIR, "fedit", {"config-sha256": "t"}),
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


def timed(children: Children, what: str, call: Callable[[], T]) -> T:
    started = time.monotonic()
    result = call()
    children.timings[what] = time.monotonic() - started
    return result
