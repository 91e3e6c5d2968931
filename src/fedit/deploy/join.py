"""`fedit join`: a data owner's process, its SuperNode child and its resident executor.

The records are read and validated first (a bad file is reported before anything joins),
then the SuperNode starts (kept running by SuperNodeKeeper: a refused activation is
retried for `activation_wait` seconds, a coordinator not up yet waited for `connect_wait`
seconds, a TLS failure reported at once), and this process
takes the SuperNode's tasks itself (flower_io.serve_client_tasks) until stopped, so the
model the first round loads stays resident for the run.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from fedit.deploy.flower.flower_io import serve_client_tasks
from fedit.deploy.flower.processes import SuperNode, SuperNodeKeeper, ensure_secret, free_port
from fedit.deploy.owner import DataOwner, OwnerInputs

log = logging.getLogger("fedit.join")


def join_federation(
    inputs: OwnerInputs,
    server: str,
    root_cert: Path | None,
    key: Path | None,
    insecure: bool,
    activation_wait: float,
    connect_wait: float,
    stop: threading.Event | None = None,
) -> None:
    """Serve this owner's rounds until the process is stopped or `stop` is set (or the
    SuperNode fails for good, which is raised)."""
    owner = DataOwner.joining(inputs)
    node_dir = inputs.state_dir / "node"
    node_dir.mkdir(parents=True, exist_ok=True)
    secret = ensure_secret(node_dir / "superexec.secret")
    port = free_port()

    def make() -> SuperNode:
        return SuperNode(
            node_dir,
            server,
            None if insecure else root_cert,
            None if insecure else key,
            port,
            insecure,
            superexec_secret_file=secret,
        )

    # An owner may well start before the coordinator: its SuperNode keeps retrying.
    keeper = SuperNodeKeeper(
        make, activation_wait, say=log.warning, ready_timeout=connect_wait, stopped=stop
    )
    log.info("connecting to %s (waiting up to %.0f s for the coordinator)", server, connect_wait)
    with keeper:
        assert keeper.node is not None
        log.info("joined %s as node %s; waiting for rounds", server, keeper.node.node_id)
        serve_client_tasks(
            keeper.node.runtime_address,
            owner.handle,
            stop=keeper.stopped,
            superexec_secret=secret.read_bytes(),
        )
    if keeper.failed is not None:
        raise keeper.failed
