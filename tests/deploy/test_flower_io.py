"""flower_io's own policies, without Flower processes: what replaces Flower's
process-ending retry and heartbeat behaviour, the executor's stop, and exchange's
matching of replies to destinations (on a stand-in grid)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest

pytest.importorskip("flwr")

from flwr.proto.runtime_pb2 import SendTaskHeartbeatResponse

from fedit.deploy.flower import flower_io
from fedit.deploy.flower.processes import free_port


@pytest.fixture
def sigints() -> Iterator[list[int]]:
    """Every SIGINT this process gets while the test runs (Flower's default reaction to
    a refused call or heartbeat: it would end a resident executor)."""
    got: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        yield got
    finally:
        signal.signal(signal.SIGINT, previous)


def status_error(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://127.0.0.1/v1/runtime/x")
    return httpx.HTTPStatusError(str(code), request=request, response=httpx.Response(code))


def test_a_refused_call_gives_up_without_signalling_this_process(sigints: list[int]) -> None:
    calls = []

    def refused() -> None:
        calls.append(1)
        raise status_error(401)

    with pytest.raises(httpx.HTTPStatusError):
        flower_io._retry_invoker().invoke(refused)
    assert calls == [1] and sigints == []


def test_a_busy_runtime_is_retried() -> None:
    answers = iter([status_error(503), httpx.ConnectError("refused"), "done"])

    def flaky() -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert flower_io._retry_invoker().invoke(flaky) == "done"


def test_a_refused_heartbeat_marks_the_task_lost_without_signalling(sigints: list[int]) -> None:
    beat = flower_io.TaskHeartbeat("127.0.0.1:1", "flwr-clientapp", "token", None)
    beat._client = SimpleNamespace(
        SendTaskHeartbeat=lambda request: SendTaskHeartbeatResponse(success=False),
        close=lambda: None,
    )
    assert beat._beat() is True  # done: Flower's sender does not retry it
    assert beat.lost.is_set() and sigints == []


def test_the_executor_stops_when_asked_even_without_a_supernode() -> None:
    stop = threading.Event()
    address = f"127.0.0.1:{free_port()}"  # nothing listens: every AcquireTask fails
    worker = threading.Thread(
        target=flower_io.serve_client_tasks, args=(address, lambda m: pytest.fail(), stop)
    )
    worker.start()
    time.sleep(0.5)
    stop.set()
    worker.join(5)
    assert not worker.is_alive()


class StandInGrid:
    """push_messages / pull_messages as HttpGrid answers them: ids in push order ("" for
    a message the SuperLink did not accept), then replies in batches as they arrive."""

    def __init__(self, ids: list[str], batches: list[list[SimpleNamespace]]) -> None:
        self.ids, self.batches, self.pulls = ids, batches, 0

    def push_messages(self, messages: list[SimpleNamespace]) -> list[str]:
        return self.ids

    def pull_messages(self, ids: list[str]) -> list[SimpleNamespace]:
        self.pulls += 1
        return (
            [r for r in self.batches.pop(0) if r.metadata.reply_to_message_id in ids]
            if self.batches
            else []
        )


def message(dst: int) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=dst))


def reply(to: str, src: int) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=to, src_node_id=src))


def test_exchange_keys_replies_by_the_message_they_answer() -> None:
    # node 7's reply claims to come from node 9: the key is still the destination, 7
    late, claims_nine = reply("m2", 8), reply("m1", 9)
    grid = StandInGrid(["m1", "m2"], [[claims_nine], [], [late]])
    messages = [message(7), message(8)]
    got = flower_io.exchange(grid, messages, time.monotonic() + 10, poll=0.01)
    assert got == {7: claims_nine, 8: late} and grid.pulls == 3


def test_exchange_returns_what_arrived_by_the_deadline() -> None:
    early = reply("m1", 7)
    grid = StandInGrid(["m1", "m2", ""], [[early]])
    started = time.monotonic()
    messages = [message(7), message(8), message(9)]
    got = flower_io.exchange(grid, messages, started + 0.3, poll=0.05)
    assert got == {7: early}
    assert grid.pulls > 1  # it kept pulling for node 8 until the deadline


def test_exchange_refuses_two_messages_for_one_node() -> None:
    with pytest.raises(ValueError, match="same node"):
        flower_io.exchange(StandInGrid([], []), [message(7), message(7)], time.monotonic() + 1)
