"""The Flower transport against real flower-superlink / flower-supernode processes.

One federation (TLS, node authentication, SuperExec secret, three owners with resident
executors) is shared by the module; tests that need a node of their own start it.
The messages are generic (a numpy array in, the array plus the node's delta out), so
nothing here needs torch or a model.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("flwr")

from cryptography.hazmat.primitives import serialization
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedit.deploy.flower import flower_io, flwr_cli, processes
from fedit.deploy.flower.flower_io import exchange, online_nodes
from fedit.deploy.flower.front import FleetFront
from fedit.deploy.flower.processes import (
    ActivationRefused,
    FederationError,
    SuperLink,
    SuperNode,
    SuperNodeKeeper,
    TlsError,
)
from tests.deploy.conftest import Children, Federation, Owner, timed

pytestmark = pytest.mark.deploy

X = np.arange(6, dtype=np.float32) / 3


def train_message(owner: Owner, x: np.ndarray, round_number: int, **extra: object) -> Message:
    content = RecordDict({"x": ArrayRecord({"x": Array(x)}), **extra})
    return Message(
        content,
        dst_node_id=owner.node_id,
        message_type="train",
        group_id=str(round_number),
        ttl=300,
    )


def within(seconds: float) -> float:
    return time.monotonic() + seconds


def assert_answered(reply: Message, owner: Owner, x: np.ndarray, round_number: int) -> None:
    assert reply.has_content(), reply.error if reply.has_error() else None
    assert reply.metadata.src_node_id == owner.node_id
    assert reply.metadata.group_id == str(round_number)
    np.testing.assert_array_equal(
        reply.content["x"]["x"].numpy(), x + np.float32(owner.executor.delta)
    )
    node = reply.content["node"]
    assert node["pid"] == owner.executor.child.pid and node["loads"] == 1


def test_two_rounds_reach_each_resident_executor(federation: Federation) -> None:
    """(a) TLS + node auth: every round's reply comes from the one long-lived executor
    process of its node (same PID, loaded once), with the value the node computes."""
    grid, owners = federation.run.grid, federation.owners
    x = X
    for round_number in (1, 2):
        messages = [train_message(o, x, round_number) for o in owners]
        replies = timed(
            federation.children,
            f"exchange round {round_number} (3 nodes)",
            lambda m=messages: exchange(grid, m, within(60)),
        )
        assert sorted(replies) == sorted(o.node_id for o in owners)
        for owner in owners:
            assert_answered(replies[owner.node_id], owner, x, round_number)
        x = np.mean([replies[o.node_id].content["x"]["x"].numpy() for o in owners], axis=0)
    np.testing.assert_allclose(x, X + 2 * (1 + 2 + 4) / 3, rtol=1e-6)
    for owner in owners:
        tasks = owner.executor.events("task")
        assert [t["outcome"] for t in tasks] == ["ok", "ok"]
        assert {t["pid"] for t in tasks} == {owner.executor.child.pid}
        assert [s["records"] for s in owner.executor.events("sent")] == [["node", "x"]] * 2


def test_online_nodes_carry_the_registered_keys(federation: Federation) -> None:
    found = {n.node_id: n.public_key for n in online_nodes(federation.run.grid)}
    for owner in federation.owners:
        registered = serialization.load_ssh_public_key(owner.public_key.read_bytes())
        seen = serialization.load_pem_public_key(found[owner.node_id])
        assert seen.public_numbers() == registered.public_numbers()


def test_a_failing_handler_gets_a_short_error_reply_and_the_executor_goes_on(
    federation: Federation,
) -> None:
    grid, owner = federation.run.grid, federation.owners[0]
    before = len(owner.executor.events("task"))
    failing = train_message(owner, X, 10, **{"raise": ConfigRecord({"yes": True})})
    reply = exchange(grid, [failing], within(60))[owner.node_id]
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason == "the data owner's handler raised ValueError"  # no record text
    assert_answered(
        exchange(grid, [train_message(owner, X, 11)], within(60))[owner.node_id], owner, X, 11
    )
    assert [t["outcome"] for t in owner.executor.events("task")[before:]] == ["error", "ok"]


def test_an_expired_message_is_answered_without_running_the_handler(federation: Federation) -> None:
    """The SuperNode takes its next message only after a reply, so an expired one is
    answered (an Error), never dropped, and the handler does not run."""
    message = train_message(federation.owners[0], X, 12)
    created = message.metadata.created_at
    assert not flower_io.expired(message, now=created + 299)
    assert flower_io.expired(message, now=created + 301)
    message.metadata.created_at = created - 301
    reply, outcome = flower_io.reply_for(message, handle=lambda m: pytest.fail("handler ran"))
    assert outcome == "expired" and reply.error.code == ErrorCode.MESSAGE_UNAVAILABLE


def test_an_unregistered_node_is_refused_and_gets_nothing(
    federation: Federation, tmp_path: Path
) -> None:
    """(b) A key the coordinator never registered cannot activate: the keeper retries for
    its activation wait, saying why, then gives up naming both causes; the node never
    appears online and receives nothing."""
    key, pub = federation.pki.node("stranger")
    said: list[str] = []
    nodes: list[SuperNode] = []

    def make() -> SuperNode:
        node = SuperNode(
            tmp_path, federation.link.address, federation.pki.ca, key, processes.free_port(), False
        )
        nodes.append(federation.children.add(node))
        return node

    # 20 s: room for a second attempt even where starting one SuperNode (importing flwr)
    # takes 3-5 s; with 5 s the first attempt alone could use the whole wait (seen in CI)
    with pytest.raises(ActivationRefused) as refused:
        SuperNodeKeeper(make, activation_wait=20, say=said.append).start()
    assert "not registered, or the coordinator still sees this key online (wait ~60 s)" in str(
        refused.value
    )
    assert "gave up after 20 s" in str(refused.value)
    assert len(nodes) >= 2 and len(said) == len(nodes) - 1 and "retrying in" in said[0]
    assert all(n.exit_code() is not None for n in nodes)
    stranger = serialization.load_ssh_public_key(pub.read_bytes()).public_numbers()
    keys = [
        serialization.load_pem_public_key(n.public_key).public_numbers()
        for n in online_nodes(federation.run.grid)
    ]
    assert stranger not in keys
    assert "Receiving" not in (tmp_path / "supernode.log").read_text()


def test_a_wrong_root_certificate_is_a_tls_error_at_once(
    federation: Federation, tmp_path: Path
) -> None:
    """(c) A SuperNode that does not trust the SuperLink's certificate: a TLS error,
    reported at once (retrying cannot help)."""
    key, pub = federation.pki.node("wrong-ca")
    flwr_cli.register_node(federation.flwr_home, "fedit", pub, "wrong-ca")
    said: list[str] = []

    def make() -> SuperNode:
        node = SuperNode(
            tmp_path,
            federation.link.address,
            federation.pki.other_ca,
            key,
            processes.free_port(),
            False,
        )
        return federation.children.add(node)

    with pytest.raises(TlsError, match="failed certificate verification against .*other/ca.pem"):
        SuperNodeKeeper(make, activation_wait=60, say=said.append).start()
    assert said == []


def test_node_auth_without_tls_is_refused(federation: Federation, tmp_path: Path) -> None:
    key, _ = federation.pki.node("plain")
    node = federation.children.add(
        SuperNode(tmp_path, federation.link.address, None, key, processes.free_port(), True)
    )
    with pytest.raises(FederationError, match="node authentication needs TLS"):
        node.start()


def test_a_node_killed_mid_round_leaves_the_others_replies(federation: Federation) -> None:
    """(d) A node killed while it handles the round's message: exchange returns the
    other nodes' replies when the deadline passes, without the dead node's."""
    victim = federation.start_owner("victim", 8.0)
    messages = [train_message(o, X, 20) for o in federation.owners]
    messages.append(train_message(victim, X, 20, sleep=ConfigRecord({"seconds": 120.0})))
    result: dict[int, Message] = {}
    deadline = within(15)
    worker = threading.Thread(
        target=lambda: result.update(exchange(federation.run.grid, messages, deadline))
    )
    worker.start()
    victim.executor.wait_event("handling", timeout=30)
    for child in (victim.executor.child, victim.node):
        os.killpg(child.pid, signal.SIGKILL)
    worker.join(30)
    assert not worker.is_alive()
    assert sorted(result) == sorted(o.node_id for o in federation.owners)
    for owner in federation.owners:
        assert_answered(result[owner.node_id], owner, X, 20)


def raw_request(port: int, ca: Path, target: str) -> int:
    """The status of `POST target` sent as is (an HTTP client would normalise the path)."""
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(
            f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        return int(tls.recv(4096).split(b" ", 2)[1])


def test_the_fleet_front_carries_a_node_and_nothing_else(federation: Federation) -> None:
    """(e) A node connected through the front trains (its executor signs AcquireTask with
    the secret its SuperNode was started with); the Control and Runtime APIs, and any
    path that is not a Fleet endpoint, are 404 through it."""
    pki, link = federation.pki, federation.link
    with FleetFront("127.0.0.1", 0, link.address, pki.ca, pki.cert, pki.key) as front:
        remote = federation.start_owner(
            "remote", 16.0, superlink=f"127.0.0.1:{front.port}", secret=True
        )
        reply = exchange(federation.run.grid, [train_message(remote, X, 30)], within(60))
        assert_answered(reply[remote.node_id], remote, X, 30)
        refused = [
            "/v1/control/list-runs",
            "/v1/control/register-node",
            "/v1/runtime/acquire-task",
            "/v1/fleet/../control/list-runs",
            "/v1/fleet/%2e%2e/control/list-runs",
            "/v1/fleet/pull-messages/../../control/list-runs",
            "/docs",
            "/health",
        ]
        assert {t: raw_request(front.port, pki.ca, t) for t in refused} == dict.fromkeys(
            refused, 404
        )
        with httpx.Client(verify=ssl.create_default_context(cafile=pki.ca)) as client:
            assert (
                client.get(f"https://127.0.0.1:{front.port}/v1/fleet/pull-messages").status_code
                == 404
            )
        remote.executor.child.stop()
        remote.node.stop()


def test_the_fleet_front_answers_502_when_the_superlink_is_down(federation: Federation) -> None:
    pki = federation.pki
    down = f"127.0.0.1:{processes.free_port()}"
    with (
        FleetFront("127.0.0.1", 0, down, pki.ca, pki.cert, pki.key) as front,
        httpx.Client(verify=ssl.create_default_context(cafile=pki.ca)) as client,
    ):
        answer = client.post(f"https://127.0.0.1:{front.port}/v1/fleet/pull-messages", content=b"")
        too_large = client.post(
            f"https://127.0.0.1:{front.port}/v1/fleet/push-object", content=bytes(33 * 2**20)
        )
    assert answer.status_code == 502
    assert too_large.status_code == 413  # refused before anything is forwarded


def test_the_keeper_restarts_a_supernode_that_dies(federation: Federation, tmp_path: Path) -> None:
    """§2.7: a SuperNode child that exits after it activated is started again. (Stopped
    with SIGTERM it deactivates first, so the restart activates at once; after a SIGKILL
    the same restart waits out Flower's ~60 s online window.)"""
    key, pub = federation.pki.node("kept")
    flwr_cli.register_node(federation.flwr_home, "fedit", pub, "kept")
    port = processes.free_port()  # the executor's address stays the same across restarts
    said: list[str] = []

    def make() -> SuperNode:
        node = SuperNode(tmp_path, federation.link.address, federation.pki.ca, key, port, False)
        return federation.children.add(node)

    with SuperNodeKeeper(make, activation_wait=60, say=said.append) as keeper:
        first = keeper.node
        assert first is not None and first.node_id is not None
        os.killpg(first.pid, signal.SIGTERM)
        deadline = within(60)
        while keeper.node is first or keeper.node.node_id is None:
            assert time.monotonic() < deadline and keeper.failed is None, said
            time.sleep(0.2)
        assert keeper.node.node_id == first.node_id and keeper.node.pid != first.pid
    assert any("restarting" in line for line in said)
    assert keeper.node.exit_code() is not None  # stopped with the keeper


def test_a_wrong_superexec_secret_is_refused_at_once(federation: Federation) -> None:
    link, pki = federation.link, federation.pki
    with pytest.raises(FederationError, match="SuperExec secret does not match"):
        flower_io.acquire_server_run(
            link.address, b"not the secret", pki.ca.read_bytes(), timeout=30
        )


def test_a_plain_http_federation_works_end_to_end(
    federation: Federation, children: Children, tmp_path: Path
) -> None:
    """--insecure on both ends (root certificates None everywhere): the same calls over
    plain HTTP. The shared run's TaskIdentity is put back afterwards: it is per process."""
    saved = (TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id)
    secret = processes.ensure_secret(tmp_path / "superexec.secret")
    link = children.add(SuperLink(tmp_path / "link", processes.free_port(), None, False, secret))
    link.start()
    home = tmp_path / "flwr-cli"
    flwr_cli.write_connection(home, "plain", link.address, None, True)
    node = SuperNode(tmp_path / "node", link.address, None, None, processes.free_port(), True)
    children.add(node).start()
    executor = children.executor(tmp_path / "node", node.runtime_address, 0.5)
    flwr_cli.submit_run(home, flwr_cli.APP_DIR, "plain", {"config-sha256": "plain"})
    run = flower_io.acquire_server_run(link.address, secret.read_bytes(), None)
    try:
        owner = Owner("plain", node, executor, tmp_path / "none.pub")
        reply = exchange(run.grid, [train_message(owner, X, 1)], within(60))
        assert_answered(reply[node.node_id], owner, X, 1)
        assert run.run_config == {"config-sha256": "plain"}
    finally:
        run.finish(True, "")
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = saved
