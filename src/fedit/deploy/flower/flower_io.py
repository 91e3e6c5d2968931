"""Every call fedit makes into Flower 1.42's internal runtime API, in one module.

These are not a documented API (design §1.4, §6): each function names the flwr file it
mirrors, flwr is pinned to 1.42.*, and tests/deploy/ drives them against real processes.
Paths below are relative to `site-packages/flwr/`.

Two Flower behaviours are replaced here because they end the calling process, which a
long-lived executor cannot allow: the HTTP retry policy of
`supercore/retry/http_retry.py` sends SIGINT to its own process on a 401 (Flower's task
processes stop themselves that way), and the task heartbeat of `supercore/heartbeat.py`
raises SIGINT when the runtime refuses it. `_retry_invoker` keeps Flower's policy (retry
transport errors and 502/503/504, give up on TLS errors and other statuses) without the
signal; `TaskHeartbeat` records a refusal in `lost` instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import zip_longest

import httpx
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, context_to_proto, run_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    AcquireTaskResponse,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    PushTaskOutputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid.http_grid import HttpGrid
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from fedit.deploy.flower.processes import FederationError

log = logging.getLogger("fedit.deploy")

RETRYABLE_STATUS = {502, 503, 504}  # as F/supercore/retry/http_retry.py
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"  # the one SuperExec-signed call
EXPIRED_REASON = "message expired before the executor took it"


def _retry_invoker(max_time: float = 60.0) -> RetryInvoker:
    """F/supercore/retry/http_retry.py make_simple_http_retry_invoker's policy without
    its SIGINT on 401 and with a time limit: a call gives up after `max_time` s."""

    def give_up(err: Exception) -> bool:
        if isinstance(err, httpx.HTTPStatusError):
            return err.response.status_code not in RETRYABLE_STATUS
        return any(word in str(err).lower() for word in ("certificate", "ssl", "tls"))

    return RetryInvoker(
        lambda: exponential(max_delay=10),
        (httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=max_time,
        should_giveup=give_up,
    )


def _runtime_client(
    address: str,
    component: str,
    root_certificates: bytes | None,
    *,
    token: str | None = None,
    superexec_secret: bytes | None = None,
    retry: RetryInvoker | None = None,
) -> RuntimeHttpClient:
    """A Runtime API client as F/supercore/superexec/run_superexec.py (component
    "SuperExec", AcquireTask signed with the secret) and F/supernode/runtime/
    run_clientapp.py (a task's token) build it. `root_certificates` None: plain HTTP
    (the SuperNode's Runtime API, or an --insecure SuperLink, both on loopback)."""
    interceptors: list[ProtobufClientInterceptor] = [
        RuntimeVersionHttpInterceptor(component_name=component)
    ]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    if superexec_secret is not None:
        interceptors.append(
            SuperExecAuthHttpInterceptor(
                master_secret=superexec_secret, protected_methods=frozenset({ACQUIRE_METHOD})
            )
        )
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=root_certificates is None,
        root_certificates=root_certificates,
        interceptors=interceptors,
        retry_invoker=retry,
    )


class TaskHeartbeat:
    """Keeps a claimed task alive, as F/supercore/heartbeat.py HeartbeatSender with
    make_task_heartbeat_fn_http does, except that a refused heartbeat (the task expired or
    was taken away) sets `lost` instead of raising SIGINT in this process. Its own client
    without retries, so `stop` never waits for a retrying call."""

    def __init__(
        self, address: str, component: str, token: str, root_certificates: bytes | None
    ) -> None:
        self.lost = threading.Event()
        self._client = _runtime_client(address, component, root_certificates, token=token)
        self._sender = HeartbeatSender(self._beat)

    def _beat(self) -> bool:
        """True when done (sent, or refused for good); False asks Flower to retry."""
        if self.lost.is_set():
            return True
        try:
            answer = self._client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in RETRYABLE_STATUS:
                return False
            self.lost.set()
            return True
        if not answer.success:
            self.lost.set()
        return True

    def start(self) -> None:
        self._sender.start()

    def stop(self) -> None:
        if self._sender.is_running:
            self._sender.stop()
        self._client.close()

    def __enter__(self) -> TaskHeartbeat:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _acquire(
    executor: RuntimeHttpClient,
    task_type: str,
    stop: threading.Event,
    poll: float,
    until: float = float("inf"),
) -> AcquireTaskResponse | None:
    """One task of `task_type` from F/supercore/servicer/runtime AcquireTask, polled every
    `poll` s until one is there (None once `stop` is set or `time.monotonic()` passes
    `until`). A runtime that cannot be reached is logged once per outage and retried; one
    that refuses the call (401/403: a SuperExec secret it does not accept) is a
    FederationError, since retrying cannot help."""
    unreachable = False
    while not stop.is_set() and time.monotonic() < until:
        try:
            answer = executor.AcquireTask(AcquireTaskRequest(supported_task_types=[task_type]))
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (401, 403):
                raise FederationError(
                    f"the runtime API at {err.request.url.host}:{err.request.url.port} refused "
                    f"to hand out tasks (HTTP {err.response.status_code}): the SuperExec secret "
                    "does not match the one it was started with"
                ) from None
            unreachable = _outage(unreachable, err, stop, poll)
            continue
        except httpx.HTTPError as err:
            unreachable = _outage(unreachable, err, stop, poll)
            continue
        if unreachable:
            log.info("runtime API answering again")
            unreachable = False
        if answer.HasField("task") and answer.token:
            return answer
        stop.wait(poll)
    return None


def _outage(logged: bool, err: Exception, stop: threading.Event, poll: float) -> bool:
    """Log the first failed poll of an outage, wait a little; True (now logged)."""
    if not logged:
        log.warning("runtime API not answering (%s); retrying", _short(err))
    stop.wait(max(poll, 1.0))
    return True


def _short(err: BaseException) -> str:
    """An exception as one short line (an HTTP status, or the first line of the text)."""
    if isinstance(err, httpx.HTTPStatusError):
        return f"HTTP {err.response.status_code}"
    text = str(err).splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


# ---- data owner: the resident ClientApp executor ----


# The executor pulls a task's content from its own SuperNode, on this machine, while the
# SuperNode may still be downloading it from the coordinator: the SuperNode creates the task
# first (F/supernode/start_client_internal.py _pull_and_store_message). Flower's backoff
# for a missing object grows from 1 s to 10 s (F/supercore/constant.py PULL_INITIAL_BACKOFF,
# PULL_BACKOFF_CAP); a loopback poll is cheap, so it polls at most every half second (in the
# demo, an owner's wait from taking its round-2 task to training fell from 23 s to 18 s).
LOCAL_PULL_BACKOFF, LOCAL_PULL_BACKOFF_CAP = 0.05, 0.5


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context]:
    """The task's message and context: F/supernode/runtime/run_clientapp.py
    pull_task_input, with the local backoff above and without the FAB (never installed)."""
    task_input = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = task_input.task_id
    TaskIdentity.run_id = task_input.run.run_id
    TaskIdentity.node_id = task_input.context.node_id
    context = context_from_proto(task_input.context)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the task has no message")
    node, run_id = Node(node_id=context.node_id), context.run_id
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, run_id),
        return_type=Message,
        initial_backoff=LOCAL_PULL_BACKOFF,
        backoff_cap=LOCAL_PULL_BACKOFF_CAP,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower sets it
    return message, context


@dataclass(frozen=True)
class TaskReport:
    """What one task did, for the caller's log or counters (no message content)."""

    task_id: int
    run_id: int
    group_id: str  # the round, as the coordinator numbers it
    outcome: str  # "ok" | "error" (handler raised) | "expired" | "failed" (transport)
    seconds: float


def send_reply(client: RuntimeHttpClient, reply: Message, context: Context) -> None:
    """Push one reply to the SuperNode (F/supernode/runtime/run_clientapp.py push_message).
    Every Message a data owner sends goes through here and nowhere else, so a test can
    record everything an owner sends (design §3, test 3)."""
    push_message(client, reply, context)


def expired(message: Message, now: float | None = None) -> bool:
    """Whether the message's time to live ran out (metadata.created_at + ttl, seconds)."""
    meta = message.metadata
    return (time.time() if now is None else now) > meta.created_at + meta.ttl


def reply_for(message: Message, handle: Callable[[Message], RecordDict]) -> tuple[Message, str]:
    """The reply to `message` and its outcome. An expired message is not handled; a
    handler that raises gets an Error reply naming only the exception's type (its text
    could hold training data; the traceback stays in the local log)."""
    if expired(message):
        return _error_reply(message, ErrorCode.MESSAGE_UNAVAILABLE, EXPIRED_REASON), "expired"
    try:
        content = handle(message)
        if not isinstance(content, RecordDict):
            raise TypeError(f"handler returned {type(content).__name__}, not a RecordDict")
    except Exception as err:
        log.exception("handler raised %s", type(err).__name__)
        reason = f"the data owner's handler raised {type(err).__name__}"
        return _error_reply(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), "error"
    return Message(content, reply_to=message), "ok"


def _error_reply(message: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=message)


def serve_one(
    runtime_address: str,
    acquired: AcquireTaskResponse,
    handle: Callable[[Message], RecordDict],
) -> TaskReport:
    """One ClientApp task, as F/supernode/runtime/run_clientapp.py run_clientapp runs it
    (heartbeat, pull_task_input, reply, push_message, push_task_output) minus the FAB: it
    is pulled with the task and never installed or executed. Every message gets a reply
    (the SuperNode waits for one before it takes the next message); if pushing fails, the
    SuperNode answers with CLIENT_APP_CRASHED once the task's token expires."""
    started = time.monotonic()
    client = _runtime_client(
        runtime_address, "flwr-clientapp", None, token=acquired.token, retry=_retry_invoker()
    )
    context: Context | None = None
    run_id, group_id, outcome, status = acquired.task.run_id, "", "failed", SubStatus.FAILED
    details = "fedit executor failed to complete the task"
    try:
        with TaskHeartbeat(runtime_address, "flwr-clientapp", acquired.token, None):
            message, context = pull_task_input(client)
            group_id = message.metadata.group_id
            reply, outcome = reply_for(message, handle)
            send_reply(client, reply, context)
        if outcome == "ok":
            status, details = SubStatus.COMPLETED, ""
        else:
            details = f"the reply is an error: {outcome}"
    except Exception as err:
        log.warning("task %d failed: %s", acquired.task.task_id, _short(err))
        outcome = "failed"
    finally:
        push_task_output(client, context, status, details)  # logs its own HTTP errors
        client.close()
    return TaskReport(acquired.task.task_id, run_id, group_id, outcome, time.monotonic() - started)


def serve_client_tasks(
    runtime_address: str,
    handle: Callable[[Message], RecordDict],
    stop: threading.Event | None = None,
    on_task: Callable[[TaskReport], None] | None = None,
    *,
    superexec_secret: bytes | None = None,
    poll: float = 0.2,
) -> None:
    """The resident ClientApp executor of a SuperNode started with --isolation process
    (design §1.4): take each ClientApp task from the SuperNode's Runtime API at
    `runtime_address` (AcquireTask as F/supercore/superexec/run_superexec.py, polled every
    `poll` s), answer its message with `Message(handle(message), reply_to=message)`, and
    wait for the next, until `stop` is set. The handler runs in this process, so whatever
    it keeps (the base model) stays loaded between rounds. A failed task is logged and
    reported, never ends the loop. `superexec_secret`: when the SuperNode was started with
    --superexec-auth-secret-file, so that no other local process can take its tasks."""
    stop = stop if stop is not None else threading.Event()
    executor = _runtime_client(
        runtime_address, "SuperExec", None, superexec_secret=superexec_secret
    )
    try:
        while (acquired := _acquire(executor, TaskType.CLIENT_APP, stop, poll)) is not None:
            report = serve_one(runtime_address, acquired, handle)
            log.info(
                "task %d (run %d, round %s): %s in %.2f s",
                report.task_id,
                report.run_id,
                report.group_id or "-",
                report.outcome,
                report.seconds,
            )
            if on_task is not None:
                on_task(report)
    finally:
        executor.close()


# ---- coordinator: the resident ServerApp executor ----


@dataclass(frozen=True)
class NodeInfo:
    """An online SuperNode of the run: its id and the public key it authenticates with
    (PEM SubjectPublicKeyInfo, compare with the roster keys, design §2.5)."""

    node_id: int
    name: str
    public_key: bytes


@dataclass
class ServerRun:
    """The run's ServerApp task, held by this process: `grid` pushes and pulls messages."""

    grid: HttpGrid
    run_id: int
    run_config: dict[str, object]
    heartbeat: TaskHeartbeat
    context: Context
    finished: bool = field(default=False)

    @property
    def lost(self) -> bool:
        """Whether the SuperLink refused the task's heartbeat (the task expired)."""
        return self.heartbeat.lost.is_set()

    def finish(self, ok: bool, reason: str) -> None:
        """End the task (F/superlink/runtime/run_serverapp.py on_exit: PushTaskOutput with
        COMPLETED or FAILED and `reason`), stop the heartbeat, close the grid."""
        if self.finished:
            return
        self.finished = True
        request = PushTaskOutputRequest(
            context=context_to_proto(self.context),
            sub_status=SubStatus.COMPLETED if ok else SubStatus.FAILED,
            details=reason,
        )
        try:
            self.grid._runtime_client.PushTaskOutput(request)
        except httpx.HTTPError as err:
            log.warning("could not report the end of run %d: %s", self.run_id, _short(err))
        finally:
            self.heartbeat.stop()
            self.grid.close()


def acquire_server_run(
    runtime_address: str,
    superexec_secret: bytes,
    root_certificates: bytes | None,
    *,
    timeout: float = 60.0,
    poll: float = 0.2,
) -> ServerRun:
    """Take the ServerApp task of the run `flwr run` created on a SuperLink started with
    --isolation process and --superexec-auth-secret-file, and set up its grid, as
    F/superlink/runtime/run_serverapp.py does (AcquireTask signed with the secret,
    HttpGrid with the task token, heartbeat, PullTaskInput, TaskIdentity, set_run) minus
    the FAB and the app. `root_certificates` None: the SuperLink runs --insecure.
    FederationError if no run is waiting within `timeout` s."""
    executor = _runtime_client(
        runtime_address, "SuperExec", root_certificates, superexec_secret=superexec_secret
    )
    try:
        until = time.monotonic() + timeout
        acquired = _acquire(executor, TaskType.SERVER_APP, threading.Event(), poll, until)
    finally:
        executor.close()
    if acquired is None:
        raise FederationError(f"no run to serve on {runtime_address} after {timeout:.0f} s")
    grid = HttpGrid(
        runtime_api_address=runtime_address,
        insecure=root_certificates is None,
        root_certificates=root_certificates,
        token=acquired.token,
    )
    grid._retry_invoker = _retry_invoker()  # read when the grid first connects
    heartbeat = TaskHeartbeat(runtime_address, "flwr-serverapp", acquired.token, root_certificates)
    heartbeat.start()
    try:
        task_input = grid._runtime_client.PullTaskInput(PullTaskInputRequest())
    except BaseException:
        heartbeat.stop()
        grid.close()
        raise
    # a Message a ServerApp creates takes its run, source node and task from here
    TaskIdentity.task_id = task_input.task_id
    TaskIdentity.run_id = task_input.run.run_id
    TaskIdentity.node_id = task_input.context.node_id
    run = run_from_proto(task_input.run)
    grid.set_run(run)
    return ServerRun(
        grid,
        run.run_id,
        dict(run.override_config),
        heartbeat,
        context_from_proto(task_input.context),
    )


def online_nodes(grid: HttpGrid) -> list[NodeInfo]:
    """The run's online SuperNodes (F/superlink/grid/http_grid.py get_nodes: ONLINE nodes
    of the run's federation, F/server/superlink/linkstate/sql_linkstate.py get_nodes)."""
    return [NodeInfo(n.node_id, n.name, bytes(n.public_key)) for n in grid.get_nodes()]


def exchange(
    grid: HttpGrid, messages: list[Message], deadline: float, poll: float = 0.5
) -> dict[int, Message]:
    """Push `messages` (one per destination node) and pull their replies every `poll` s
    until all are in or `time.monotonic()` passes `deadline`; the replies by destination
    node id. Not Grid.send_and_receive, whose pull interval is a fixed 3 s
    (F/superlink/grid/http_grid.py). A reply is matched to its destination through the
    id of the message it answers, never through its content; error replies (Flower's
    NODE_UNAVAILABLE, CLIENT_APP_CRASHED, an executor's error) are kept; a node without a
    reply is absent."""
    destinations = [m.metadata.dst_node_id for m in messages]
    if len(set(destinations)) != len(destinations):
        raise ValueError("exchange: more than one message for the same node")
    # an id is "" or None for a message the SuperLink refused; the list is empty when the
    # request was too large (HttpGrid.push_messages logs it)
    pushed = zip_longest(destinations, grid.push_messages(messages), fillvalue="")
    waiting = {mid: node for node, mid in pushed if mid}
    for node in set(destinations) - set(waiting.values()):
        log.warning("the SuperLink did not accept the message for node %d", node)
    replies: dict[int, Message] = {}
    while waiting:
        for reply in grid.pull_messages(list(waiting)):
            node = waiting.pop(reply.metadata.reply_to_message_id, None)
            if node is not None:
                replies[node] = reply
        left = deadline - time.monotonic()
        if not waiting or left <= 0:
            break
        time.sleep(min(poll, left))
    return replies
