"""Flower's processes as children of a fedit process (the flwr CLI calls: flwr_cli).

Every child runs in its own process group with its output in a log file; readiness is a
line in that log, waited for with a deadline; stopping is SIGTERM to the group, then
SIGKILL after `STOP_GRACE` seconds. Each class is a context manager, so a child never
outlives the `with` block that started it. Every flwr process and CLI call gets an
`FLWR_HOME` of fedit's choosing (`~/.flwr` is never touched), telemetry off and no update
check (fedit runs offline). Nothing here imports flwr: the commands are executables of
the flwr package, found beside this interpreter.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from fedit.errors import RunStopped

STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL of a child's process group
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# flwr_exit (F/supercore/exit/exit.py) prints "Exit Code: N", the reason, then a link
EXIT_REASON = re.compile(r"Exit Code: (\d+)\n(.*?)(?:\n\s*\n|\nFor more information|\Z)", re.S)
NOT_ACTIVATED = "not registered, or the coordinator still sees this key online (wait ~60 s)"


class FederationError(RunStopped):
    """A Flower process or CLI call failed; the message says why and what to change."""


class TlsError(FederationError):
    """The peer's certificate did not verify: a wrong CA, or a certificate that does not
    name the address. Retrying cannot help."""


class ActivationRefused(FederationError):
    """The SuperLink refused to activate a SuperNode's key. Flower answers an unregistered
    key and a key it still counts online (up to ~60 s after a restart) the same way
    (exit 305, "[code: 2004] Failed to activate SuperNode"), so neither can be told apart."""


def flower_command(name: str) -> str:
    """The path of a flwr executable (`flower-superlink`, `flower-supernode`, `flwr`):
    beside this interpreter (a venv's bin/) first, then on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise FederationError(f"{name} not found: install flwr 1.42 (pip install 'flwr==1.42.*')")
    return found


def child_env(flwr_home: Path) -> dict[str, str]:
    """The environment of a flwr process: this one's, with its own FLWR_HOME, telemetry off
    and no update check (both would reach out to the internet)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (bind port 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ensure_secret(path: Path) -> Path:
    """The SuperExec secret file (raw bytes, F/supercore/auth/superexec_secret.py): made
    once with 32 random bytes, mode 0600, and kept, so a restarted SuperLink and executor
    agree on it."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(32))
    return path


def flwr_exit_code(log_text: str) -> tuple[int | None, str]:
    """The code and reason of flwr's last "Exit Code: N" report in a log, or (None, '').
    The report is the only place the code appears: flwr_exit ends every failing process
    with status 1, whatever the code (F/supercore/exit/exit.py)."""
    found = list(EXIT_REASON.finditer(ANSI.sub("", log_text)))
    if not found:
        return None, ""
    return int(found[-1].group(1)), found[-1].group(2).strip()


def _wait_gone(pid: int, timeout: float) -> bool:
    """Whether process `pid` (not our child: it cannot be waited for) ends within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1]
        except (ProcessLookupError, FileNotFoundError):
            return True
        if state.startswith("Z"):
            return True  # a zombie waiting for its (other) parent: already ended
        time.sleep(0.1)
    return False


class Child:
    """One child process in its own process group, its stdout and stderr appended to
    `log_path`. `spawn` returns at once; `wait_for` polls the log for a line."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name, self.argv, self.log_path, self.env = name, argv, log_path, env
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._offset = 0
        self._stopped = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def pid_path(self) -> Path:
        """Where the running child's pid is kept (beside its log), so a later start after
        this process was killed (SIGKILL, OOM: no chance to stop its children) can end the
        child it left behind, which would still hold its database, port or node identity."""
        return self.log_path.with_suffix(".pid")

    def spawn(self) -> None:
        """Start the child and return at once."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._end_leftover()
        self._log = self.log_path.open("ab")
        self._offset = self._log.tell()  # a restart appends; readiness reads only its part
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # its own process group: stop() reaches its children too
        )
        self.pid_path.write_text(f"{self.proc.pid}\n")

    def _end_leftover(self) -> None:
        """Stop the process group a killed predecessor left running (its pid file names
        it, and it runs this child's program), then forget it. The program, not the whole
        command line: a restart picks new ports; and a script's interpreter comes first."""
        try:
            pid = int(self.pid_path.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):  # no file, no such process, not Linux
            self.pid_path.unlink(missing_ok=True)
            return
        if self.argv[0] in [a.decode(errors="replace") for a in cmdline[:2]]:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, sig)
                if _wait_gone(pid, STOP_GRACE):
                    break
        self.pid_path.unlink(missing_ok=True)

    def log_text(self) -> str:
        """What this start of the child wrote so far (colour codes removed)."""
        with self.log_path.open("rb") as log:
            log.seek(self._offset)
            return ANSI.sub("", log.read().decode("utf-8", "replace"))

    def exit_code(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def start_and_wait(self, pattern: str, timeout: float) -> re.Match[str]:
        """Spawn, then `wait_for(pattern)`; a child that does not get ready is stopped."""
        self.spawn()
        try:
            return self.wait_for(pattern, timeout)
        except BaseException:
            self.stop()
            raise

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first match of `pattern` in the log; FederationError if the child exits or
        `timeout` seconds pass first."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.log_text())
            if found:
                return found
            status = self.exit_code()
            if status is not None:
                code, reason = flwr_exit_code(self.log_text())
                raise self.failure(status if code is None else code, reason)
            if time.monotonic() >= deadline:
                raise self.not_ready(timeout)
            time.sleep(0.1)

    def failure(self, code: int, reason: str) -> FederationError:
        """The error for an exit before readiness, from flwr's exit code and reason (or
        the process status); subclasses map the codes they know."""
        return FederationError(
            f"{self.name} exited with code {code}: {reason or f'see {self.log_path}'}"
        )

    def not_ready(self, timeout: float) -> FederationError:
        return FederationError(f"{self.name} not ready after {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> int | None:
        """SIGTERM to the process group, SIGKILL after STOP_GRACE s; the exit code."""
        if self.proc is None or self._stopped:
            return self.exit_code()
        self._stopped = True
        try:
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_GRACE)
            self._signal_group(signal.SIGKILL)  # also any grandchild the leader left behind
            return self.proc.wait()
        finally:
            self.pid_path.unlink(missing_ok=True)
            if self._log is not None:
                self._log.close()

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):  # the whole group is gone already
            os.killpg(self.proc.pid, sig)

    def __enter__(self) -> Child:
        self.spawn()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SuperLink(Child):
    """`flower-superlink` on 127.0.0.1:`port` (never another interface: its one port also
    serves the unauthenticated Control API and the Runtime API, design §1.6), with its
    database in `directory`, `--isolation process` (fedit's coordinator takes the ServerApp
    task itself) and no runtime dependency installation."""

    def __init__(
        self,
        directory: Path,
        port: int,
        certs: tuple[Path, Path, Path] | None,
        node_auth: bool,
        superexec_secret_file: Path | None,
    ) -> None:
        argv = [flower_command("flower-superlink"), "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--database", str(directory / "superlink.db"), "--isolation", "process"]
        argv += ["--disable-runtime-dependency-installation"]
        if certs is None:
            argv += ["--insecure"]
        else:
            ca, cert, key = certs
            argv += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert)]
            argv += ["--ssl-keyfile", str(key)]
        if node_auth:
            argv += ["--enable-supernode-auth"]
        if superexec_secret_file is not None:
            argv += ["--superexec-auth-secret-file", str(superexec_secret_file)]
        super().__init__(
            "flower-superlink", argv, directory / "superlink.log", child_env(directory / "flwr")
        )
        self.port = port
        self.database = directory / "superlink.db"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        """Start on the database of any earlier start (registrations and node ids kept),
        without the messages nobody will serve: see discard_undelivered_messages."""
        self._end_leftover()  # a killed coordinator's SuperLink holds the database
        discard_undelivered_messages(self.database)
        self.start_and_wait(r"Uvicorn running on", timeout)

    def failure(self, code: int, reason: str) -> FederationError:
        if "address already in use" in self.log_text():
            return FederationError(f"flower-superlink: port {self.port} is already in use")
        return super().failure(code, reason)

    def __enter__(self) -> SuperLink:
        self.start()
        return self


def discard_undelivered_messages(database: Path) -> int:
    """Delete the messages in a SuperLink database that no node has pulled yet; how many.

    Only for a SuperLink about to start: they were pushed by a coordinator that is gone (the
    SuperLink lives and dies with it), for a run nobody serves any more. Left in, an owner
    would pull one, and flwr 1.42's SuperNode then keeps a pending task whose content never
    arrives (F/supernode/start_client_internal.py, _pull_and_store_message's
    RunNotRunningException branch), on which the owner's executor would wait PULL_MAX_TIME
    (7200 s, F/supercore/constant.py) before it takes the resumed run's round. The table is
    Flower's `message_ins` (F/server/superlink/linkstate/sql_linkstate.py; flwr pinned 1.42.*).
    """
    if not database.is_file():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(database)) as db, db:
            return db.execute("DELETE FROM message_ins WHERE delivered_at = ''").rowcount
    except sqlite3.Error as err:
        raise FederationError(f"{database}: not a flwr 1.42 SuperLink database ({err})") from None


class SuperNode(Child):
    """`flower-supernode` connecting to `superlink` ("HOST:PORT"), `--isolation process`
    (fedit's resident executor takes its tasks), its Runtime API on 127.0.0.1:`port`.
    Ready once the SuperLink activated it ("SuperNode ID: N" in its log)."""

    def __init__(
        self,
        directory: Path,
        superlink: str,
        root_cert: Path | None,
        private_key: Path | None,
        port: int,
        insecure: bool,
        *,
        superexec_secret_file: Path | None = None,
    ) -> None:
        argv = [flower_command("flower-supernode"), "--superlink", superlink]
        argv += ["--isolation", "process", "--host", "127.0.0.1", "--port", str(port)]
        if insecure:
            argv += ["--insecure"]
        if root_cert is not None:
            argv += ["--root-certificates", str(root_cert)]
        if private_key is not None:
            argv += ["--auth-supernode-private-key", str(private_key)]
        if superexec_secret_file is not None:
            argv += ["--superexec-auth-secret-file", str(superexec_secret_file)]
        super().__init__(
            "flower-supernode", argv, directory / "supernode.log", child_env(directory / "flwr")
        )
        self.superlink, self.root_cert, self.private_key = superlink, root_cert, private_key
        self.port = port
        self.node_id: int | None = None

    @property
    def runtime_address(self) -> str:
        """Where the resident executor finds this SuperNode's tasks."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> int:
        """Start and wait until activated; the node id the SuperLink gave it."""
        self.node_id = int(self.start_and_wait(r"SuperNode ID: (\d+)", timeout).group(1))
        return self.node_id

    def failure(self, code: int, reason: str) -> FederationError:
        return supernode_failure(code, reason, self)

    def not_ready(self, timeout: float) -> FederationError:
        if "Connection attempt failed" in self.log_text():
            return FederationError(
                f"cannot reach the coordinator at {self.superlink} "
                f"(no answer after {timeout:.0f} s; flower-supernode keeps retrying)"
            )
        return super().not_ready(timeout)

    def __enter__(self) -> SuperNode:
        self.start()
        return self


def supernode_failure(code: int, reason: str, node: SuperNode) -> FederationError:
    """A clear error for flower-supernode's exit codes (F/supercore/exit/exit_code.py)
    and the reason it printed with them."""
    lines = reason.splitlines()
    # flwr's reason: a preamble line, the cause, then the code's generic help
    cause = lines[1] if len(lines) > 2 else (lines[0] if lines else f"see {node.log_path}")
    if code == 305 and re.search(r"CERTIFICATE_VERIFY|SSL|TLS|certificate", reason):
        return TlsError(
            f"TLS: the coordinator at {node.superlink} failed certificate verification "
            f"against {node.root_cert} ({cause}); check that the root certificate is "
            "the coordinator's ca.pem and that its server certificate names this address"
        )
    if code == 305 and ("code: 2004" in reason or "activate" in reason):
        return ActivationRefused(
            f"the coordinator at {node.superlink} refused to activate this node: " + NOT_ACTIVATED
        )
    if code == 305:
        return FederationError(f"cannot connect to the coordinator at {node.superlink}: {cause}")
    if code == 303:
        return FederationError("node authentication needs TLS: drop --insecure, or the node key")
    if code == 302:
        return FederationError(
            f"{node.private_key}: not an EC private key in OpenSSH format ({cause})"
        )
    if code == 600:
        return FederationError(f"{node.superlink}: not a HOST:PORT address")
    return FederationError(f"flower-supernode exited with code {code}: {cause}")


class SuperNodeKeeper:
    """An owner's SuperNode child, kept running by the policy of design §2.7.

    `start` blocks until the first activation. An activation refusal is retried with
    backoff (2 s doubling to 15 s) for `activation_wait` seconds, each wait announced
    through `say`, then raised naming both causes; a TLS failure is raised at once. After
    that a watcher thread restarts a child that dies, with the same policy; if it gives
    up, `failed` holds the error and `stopped` is set (pass `stopped` as the executor's
    `stop`, then read `failed`); setting it from outside (a signal) stops them too.
    """

    def __init__(
        self,
        make: Callable[[], SuperNode],
        activation_wait: float = 120.0,
        say: Callable[[str], None] = print,
        ready_timeout: float = 60.0,
        stopped: threading.Event | None = None,
    ) -> None:
        self.make, self.activation_wait, self.say = make, activation_wait, say
        self.ready_timeout = ready_timeout
        self.node: SuperNode | None = None
        self.failed: FederationError | None = None
        self.stopped = stopped if stopped is not None else threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="supernode-keeper", daemon=True)

    def start(self) -> int:
        node_id = self._activate()
        self._watcher.start()
        return node_id

    def _activate(self) -> int:
        deadline = time.monotonic() + self.activation_wait
        delay = 2.0
        while True:
            self.node = self.make()
            try:
                return self.node.start(self.ready_timeout)
            except ActivationRefused as err:
                self.node.stop()
                if self.stopped.is_set() or time.monotonic() + delay > deadline:
                    raise ActivationRefused(
                        f"{err} (gave up after {self.activation_wait:.0f} s)"
                    ) from None
                self.say(f"SuperNode not activated ({NOT_ACTIVATED}); retrying in {delay:.0f} s")
            except FederationError:
                self.node.stop()
                raise
            if self.stopped.wait(delay):
                raise ActivationRefused("stopped while waiting for activation")
            delay = min(2 * delay, 15.0)

    def _watch(self) -> None:
        while not self.stopped.wait(1.0):
            assert self.node is not None
            code = self.node.exit_code()
            if code is None:
                continue
            self.node.stop()
            self.say(f"flower-supernode exited (code {code}); restarting it")
            try:
                self._activate()
            except FederationError as err:
                self.failed = err
                self.stopped.set()

    def stop(self) -> None:
        self.stopped.set()
        if self._watcher.is_alive():
            self._watcher.join()
        if self.node is not None:
            self.node.stop()

    def __enter__(self) -> SuperNodeKeeper:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
