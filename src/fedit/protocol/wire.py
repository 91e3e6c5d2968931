"""fedit's two messages as Flower records: a client's round (coordinator -> owner) and its
reply (owner -> coordinator), docs/design/deployment.md §2.3-2.4.

This is the only module that knows the record names and layouts, and it holds no transport
(no Grid, no connection), so both ends and the tests encode and decode through the very
same functions. Decoding treats the content as a peer's, not ours: it checks the structure
exactly (record names, keys, types, dtypes, shapes, sizes, finite values) before anything is
built from it, and names what is wrong in a WireError short enough for metrics.jsonl. It
never converts: the wire carries float32 only, which is what fedit's adapters are, so a
bitwise round trip is what the deployment's parity with the simulation rests on.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.constant import SType
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    no_object_id_recompute,
)
from torch import Tensor

from fedit.compression import codecs
from fedit.ops.aggregation import add_scaled
from fedit.ops.ranks import grow, rank_shapes
from fedit.server.validation import non_finite_metric
from fedit.types import AdapterState, ClientInstructions, ClientTask, ClientUpdate

# Coordinator -> owner
GLOBAL, ROUND, RUN = "global", "round", "run"
# Owner -> coordinator (besides one ArrayRecord per extra, e.g. SCAFFOLD's "control_delta")
UPDATE, COUNTS, METRICS, STATUS = "update", "counts", "metrics", "status"
TASK_RECORDS = frozenset({GLOBAL, ROUND, RUN})
REPLY_RECORDS = frozenset({UPDATE, COUNTS, METRICS, STATUS})
# Names of the extra tensor groups (instructions' "c", "c_k"; reply extras)
GROUP_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
SCALAR_PREFIX = "scalar."  # instructions' scalars in the "round" record: "scalar.prox_mu"
HELD_PREFIX = "held."  # groups the owner holds, by digest, in "round": "held.c_k"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
ROUND_FIELDS = (
    "round",
    "client_id",
    "objective",
    "learning_rate",
    "seed",
    "hook",
    "feedback_round",
)
RUN_FIELDS = ("config_toml", "config_sha256", "base_fingerprint")
COUNT_FIELDS = ("num_examples", "num_steps")
STATUS_FIELDS = ("outcome", "reason")
OBJECTIVES = ("sft", "dpo")  # a round trains one of them (sft_then_dpo switches by round)
HOOKS = ("none", "fedprox", "scaffold")  # the client-side algorithms ClientInstructions names
# Replies other than "ok": training went non-finite, the owner lacks its SCAFFOLD c_k or its
# DPO reference (the coordinator re-sends them), the owner refused the task
OUTCOMES = ("non_finite", "needs_c_k", "needs_reference", "refused")
MAX_REASON = 200
# The metrics train_client (SFT) and train_client_dpo put into ClientUpdate.metrics
SFT_METRICS = frozenset(
    {
        "train_loss",
        "label_tokens",
        "real_tokens",
        "computed_tokens",
        "steps",
        "skipped_steps",
        "step_seconds",
        "seconds",
    }
)
DPO_METRICS = SFT_METRICS | {"dpo_accuracy", "dpo_margin", "reference_seconds"}
# np.save's header before the data (128 bytes for an adapter tensor): room allowed for it
# when bounding an Array's size before it is loaded
NPY_HEADER_ROOM = 1024
SEED_LIMIT = 2**64  # derive_seed gives 64-bit seeds
# The dtypes a compressed update's parts may have (fedit.compression.codecs.part_layout)
PART_DTYPES = {
    torch.float32: "float32",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.int8: "int8",
}


class WireError(ValueError):
    """A message's content is not what fedit sends; the text says where, for metrics.jsonl."""


@dataclass(frozen=True)
class RunHeader:
    """What identifies the run in every task: its config as TOML text (data paths,
    output_dir and deploy blanked by the caller), that text's sha256, and the base model's
    fingerprint (design §2.5), so an owner refuses a task for another run or model."""

    config_toml: str
    config_sha256: str
    base_fingerprint: str

    @classmethod
    def of(cls, config_toml: str, base_fingerprint: str) -> RunHeader:
        return cls(config_toml, _sha256(config_toml), base_fingerprint)


@dataclass(frozen=True)
class ReplyStatus:
    """A reply without an update: one of OUTCOMES and fedit's own reason text."""

    outcome: str
    reason: str


def shapes_of(state: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """The expected shapes decode_* checks against, from one's own adapter state."""
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def encode_state(state: Mapping[str, Tensor]) -> ArrayRecord:
    """One Array per tensor (np.save bytes, fedit's names). Contiguous float32 CPU tensors
    only, as get_adapter_state gives them: anything else is refused, never converted."""
    record = ArrayRecord()
    for name, tensor in state.items():
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
            raise ValueError(
                f"{name}: {tensor.dtype} on {tensor.device}; the wire carries float32 CPU "
                "tensors only"
            )
        if not tensor.is_contiguous():
            raise ValueError(f"{name}: not contiguous; the wire carries contiguous tensors only")
        record[name] = Array.from_numpy_ndarray(tensor.detach().numpy())
    return record


def encode_parts(parts: Mapping[str, Tensor]) -> ArrayRecord:
    """A compressed delta (fedit.compression.codecs.encode_state): one Array per part."""
    return ArrayRecord({part: Array.from_numpy_ndarray(t.numpy()) for part, t in parts.items()})


@dataclass(frozen=True)
class UploadCodec:
    """What the coordinator needs to read a compressed update: the run's codec and the
    global adapter the client's delta is taken from."""

    codec: str
    topk_fraction: float
    global_state: AdapterState


def decode_parts(
    record: object, upload: UploadCodec, expected: Mapping[str, tuple[int, ...]]
) -> AdapterState:
    """y = x + decode(parts) of a compressed update: the parts exactly the codec's layout
    for the adapter's shapes (names, dtypes, sizes), their values ones the codec writes."""
    if not isinstance(record, ArrayRecord):
        raise WireError(f"{UPDATE}: a {type(record).__name__}, expected an ArrayRecord")
    layout = codecs.state_layout(upload.codec, expected, upload.topk_fraction)
    _exact(record.keys(), layout.keys(), UPDATE)
    parts = {
        part: _decode_array(record[part], shape, f"{UPDATE} {part}", PART_DTYPES[dtype])
        for part, (dtype, shape) in layout.items()
    }
    try:
        delta = codecs.decode_state(upload.codec, parts, expected, upload.topk_fraction)
    except codecs.CodecError as err:
        raise WireError(f"{UPDATE} {err}") from None
    return add_scaled(upload.global_state, delta, 1.0)


def decode_state(
    record: object, expected: Mapping[str, tuple[int, ...]], what: str
) -> AdapterState:
    """The tensors of `record`, which must hold exactly the `expected` names and shapes,
    float32 numpy serialisation and finite values (WireError naming `what` otherwise)."""
    if not isinstance(record, ArrayRecord):
        raise WireError(f"{what}: a {type(record).__name__}, expected an ArrayRecord")
    _exact(record.keys(), expected.keys(), what)
    return {
        name: _decode_array(record[name], expected[name], f"{what} {name}") for name in expected
    }


def _decode_array(
    array: Array, shape: tuple[int, ...], where: str, dtype: str = "float32"
) -> Tensor:
    if array.stype != SType.NUMPY:
        raise WireError(f"{where}: serialised as {array.stype[:40]!r}, expected numpy")
    if array.dtype != dtype:
        raise WireError(f"{where}: dtype {array.dtype[:40]!r}, expected {dtype}")
    if tuple(array.shape) != tuple(shape):
        raise WireError(f"{where}: shape {tuple(array.shape)}, expected {tuple(shape)}")
    # bound the bytes before np.load reads them: the declared dtype and shape cost nothing
    itemsize = np.dtype(dtype).itemsize
    if len(array.data) > itemsize * math.prod(shape) + NPY_HEADER_ROOM:
        raise WireError(f"{where}: {len(array.data)} bytes, too many for its {dtype} shape")
    try:
        values = array.numpy()  # np.load(allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise WireError(f"{where}: not a readable .npy array ({type(err).__name__})") from None
    # the .npy header, not the Array's declaration, says what the bytes are
    if values.dtype != np.dtype(dtype) or values.shape != tuple(shape):
        raise WireError(f"{where}: its bytes hold {values.dtype} {values.shape}, not {dtype}")
    tensor = torch.from_numpy(np.ascontiguousarray(values))
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise WireError(f"{where}: non-finite values")
    return tensor


def encode_task(
    task: ClientTask,
    global_state: AdapterState,
    run: RunHeader,
    held: Mapping[str, str] | None = None,
) -> RecordDict:
    """A client's round: "global" (x), one ArrayRecord per instructions tensor group
    ("c", "c_k"), "round" (the task's fields, the hook and its scalars), "run" (RunHeader).

    `held` names tensor groups the owner keeps itself (SCAFFOLD's c_k, design §2.6) by
    their state_digest: those go as "held.<group>" = digest in "round", not as tensors."""
    held = dict(held or {})
    content = RecordDict({GLOBAL: encode_state(global_state)})
    for group, tensors in task.instructions.tensors.items():
        if group not in held:
            content[_group_name(group, TASK_RECORDS)] = encode_state(tensors)
    scalars = {f"{SCALAR_PREFIX}{k}": float(v) for k, v in task.instructions.scalars.items()}
    digests = {f"{HELD_PREFIX}{_group_name(g, TASK_RECORDS)}": d for g, d in held.items()}
    content[ROUND] = ConfigRecord(
        {
            "round": task.round_number,
            "client_id": task.client_id,
            "objective": task.objective,
            "learning_rate": float(task.learning_rate),
            "seed": task.seed,
            "hook": task.instructions.hook,
            "feedback_round": task.feedback_round,
            **scalars,
            **digests,
        }
    )
    content[RUN] = encode_header(run)
    return content


def decode_header(content: object) -> RunHeader:
    """The run header of a coordinator's message, checked: read first, since which model
    and adapter shapes the rest is checked against depend on the run."""
    records = _records(content, "task")
    if RUN not in records:
        raise WireError("task: no 'run' record")
    record = _typed(records, RUN, ConfigRecord)
    _exact(record.keys(), RUN_FIELDS, RUN)
    get = _reader(record, RUN)
    header = RunHeader(*(get(key, str) for key in RUN_FIELDS))
    if header.config_sha256 != _sha256(header.config_toml):
        raise WireError("run.config_sha256: not the sha256 of run.config_toml")
    if not SHA256_HEX.fullmatch(header.base_fingerprint):
        raise WireError("run.base_fingerprint: not a sha256 hex digest")
    return header


def decode_task(
    content: object,
    expected_shapes: Mapping[str, tuple[int, ...]],
    ranks: list[int] | None = None,
) -> tuple[ClientTask, AdapterState, dict[str, str]]:
    """(task, global adapter, held) of a coordinator's message: every field checked for
    type and range, every tensor against `expected_shapes` (the owner's adapter), the run
    header as decode_header checks it. `held`: {group: state_digest} of the tensor groups
    the coordinator left for the owner to fill in from its own state. With mixed LoRA
    ranks (`ranks`, fedit.ops.ranks.client_ranks) the tensors come at the task's
    client's rank and are returned zero-padded to `expected_shapes`."""
    decode_header(content)
    records = _records(content, "task")
    missing = TASK_RECORDS - records.keys()
    if missing:
        raise WireError(f"task: no {_listed(missing)} record")
    groups = sorted(records.keys() - TASK_RECORDS)
    unexpected = [g for g in groups if not GROUP_NAME.fullmatch(g)]
    if unexpected:
        raise WireError(f"task: unexpected record {_listed(unexpected)}")
    round_record = _typed(records, ROUND, ConfigRecord)
    get = _reader(round_record, ROUND)
    extra = {k for k in round_record if k.startswith((SCALAR_PREFIX, HELD_PREFIX))}
    _exact(round_record.keys() - extra, ROUND_FIELDS, ROUND)
    scalars, held = {}, {}
    for key in sorted(extra):
        if key.startswith(SCALAR_PREFIX):
            scalars[key.removeprefix(SCALAR_PREFIX)] = _finite(get(key, float), f"round.{key}")
        else:
            held[_held_group(key, groups)] = _digest(get(key, str), f"round.{key}")
    round_number = _at_least(get("round", int), 1, "round.round")
    client_id = _at_least(get("client_id", int), 0, "round.client_id")
    shapes = _shapes_at_rank(expected_shapes, ranks, client_id)
    feedback_round = _at_least(get("feedback_round", int), 0, "round.feedback_round")
    if feedback_round >= round_number:
        raise WireError(f"round.feedback_round: {feedback_round}, not before round {round_number}")
    task = ClientTask(
        round_number=round_number,
        client_id=client_id,
        objective=_one_of(get("objective", str), OBJECTIVES, "round.objective"),
        learning_rate=_positive(get("learning_rate", float), "round.learning_rate"),
        seed=_seed(get("seed", int)),
        instructions=ClientInstructions(
            hook=_one_of(get("hook", str), HOOKS, "round.hook"),
            scalars=scalars,
            tensors={g: grow(decode_state(records[g], shapes, g), expected_shapes) for g in groups},
        ),
        feedback_round=feedback_round,
    )
    global_state = grow(decode_state(records[GLOBAL], shapes, GLOBAL), expected_shapes)
    return task, global_state, held


def _shapes_at_rank(
    shapes: Mapping[str, tuple[int, ...]], ranks: list[int] | None, client_id: int
) -> dict[str, tuple[int, ...]]:
    """The shapes client `client_id`'s tensors have on the wire (its rank's)."""
    if ranks is None:
        return dict(shapes)
    if client_id >= len(ranks):
        raise WireError(f"round.client_id: {client_id}, the run has {len(ranks)} clients")
    return rank_shapes(shapes, ranks[client_id])


def state_digest(state: Mapping[str, Tensor]) -> str:
    """sha256 over the sorted (name, dtype, shape, bytes) of the tensors: how one side names
    a state the other holds (SCAFFOLD's c_k), so it need not be sent."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _held_group(key: str, sent: Iterable[str]) -> str:
    group = key.removeprefix(HELD_PREFIX)
    if not GROUP_NAME.fullmatch(group) or group in TASK_RECORDS:
        raise WireError(f"round: unexpected {_listed([key])}")
    if group in sent:
        raise WireError(f"round.{key}: {group!r} is both sent and held")
    return group


def _digest(value: str, where: str) -> str:
    if not SHA256_HEX.fullmatch(value):
        raise WireError(f"{where}: not a sha256 hex digest")
    return value


def encode_reply(update: ClientUpdate) -> RecordDict:
    """A trained round's reply: "update" (y_k), one ArrayRecord per extra ("control_delta"),
    "counts", "metrics" and "status" (outcome "ok"). The client id is not sent: the
    coordinator knows it from the sender's key. A compressed update (``update.encoded``)
    sends the encoded delta's parts as "update" in place of y_k."""
    if update.encoded is not None:
        content = RecordDict({UPDATE: encode_parts(update.encoded)})
    else:
        content = RecordDict({UPDATE: encode_state(update.state)})
    for name, tensors in update.extras.items():
        content[_group_name(name, REPLY_RECORDS)] = encode_state(tensors)
    content[COUNTS] = MetricRecord(
        {"num_examples": update.num_examples, "num_steps": update.num_steps}
    )
    content[METRICS] = MetricRecord(dict(update.metrics))
    content[STATUS] = ok_status()
    return content


def encode_status(outcome: str, reason: str) -> RecordDict:
    """A reply without an update (one of OUTCOMES); `reason` is cut to MAX_REASON chars and
    must be fedit's own wording, never record text."""
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown reply outcome {outcome!r} (known: {', '.join(OUTCOMES)})")
    return RecordDict({STATUS: ConfigRecord({"outcome": outcome, "reason": reason[:MAX_REASON]})})


def decode_reply(
    content: object,
    client_id: int,
    expected_shapes: Mapping[str, tuple[int, ...]],
    expected_extras: set[str],
    learning_rate: float,
    upload: UploadCodec | None = None,
    ranks: list[int] | None = None,
) -> ClientUpdate | ReplyStatus:
    """The ClientUpdate of an "ok" reply, else its ReplyStatus. The structure must be exactly
    what encode_reply / encode_status write for this strategy (`expected_extras`), with ints
    for the counts and known, finite metrics; `client_id` and `learning_rate` are the
    coordinator's own (never taken from the content), as is `upload`, the codec of a run
    whose clients send compressed deltas (None: y_k in float32), its global adapter at
    the client's rank. With mixed LoRA ranks (`ranks`) the tensors come at the client's
    rank and are returned zero-padded to `expected_shapes`. WireError names what is
    wrong."""
    records = _records(content, "reply")
    status = decode_status(records)
    if status is not None:
        return status
    _exact(records.keys(), REPLY_RECORDS | expected_extras, "reply")
    counts = _typed(records, COUNTS, MetricRecord)
    _exact(counts.keys(), COUNT_FIELDS, COUNTS)
    metrics = _typed(records, METRICS, MetricRecord)
    is_dpo = bool(metrics.keys() & (DPO_METRICS - SFT_METRICS))
    _exact(metrics.keys(), DPO_METRICS if is_dpo else SFT_METRICS, METRICS)
    problem = non_finite_metric(metrics)
    if problem is not None:
        raise WireError(f"metrics: {problem}")
    read_count = _reader(counts, COUNTS)
    shapes = _shapes_at_rank(expected_shapes, ranks, client_id)
    if upload is None:
        state = decode_state(records[UPDATE], shapes, UPDATE)
    else:
        state = decode_parts(records[UPDATE], upload, shapes)
    return ClientUpdate(
        client_id=client_id,
        state=grow(state, expected_shapes),
        num_examples=read_count("num_examples", int),
        num_steps=read_count("num_steps", int),
        learning_rate=learning_rate,
        extras={
            e: grow(decode_state(records[e], shapes, e), expected_shapes)
            for e in sorted(expected_extras)
        },
        metrics=dict(metrics),
    )


def decode_status(records: Mapping[str, object]) -> ReplyStatus | None:
    """A reply's status record, checked: None for "ok" (the rest of the reply follows),
    else the ReplyStatus of a reply that must hold nothing else."""
    if STATUS not in records:
        raise WireError("reply: no status record")
    status = _typed(records, STATUS, ConfigRecord)
    _exact(status.keys(), STATUS_FIELDS, STATUS)
    get = _reader(status, STATUS)
    outcome = _one_of(get("outcome", str), ("ok", *OUTCOMES), "status.outcome")
    reason = get("reason", str)
    if len(reason) > MAX_REASON:
        raise WireError(f"status.reason: longer than {MAX_REASON} characters")
    if outcome == "ok":
        return None
    _exact(records.keys(), {STATUS}, "reply")
    return ReplyStatus(outcome, reason)


def ok_status() -> ConfigRecord:
    return ConfigRecord({"outcome": "ok", "reason": ""})


def encode_header(run: RunHeader) -> ConfigRecord:
    """The "run" record every coordinator message carries."""
    return ConfigRecord({key: getattr(run, key) for key in RUN_FIELDS})


def content_bytes(content: RecordDict) -> int:
    """The bytes `content` puts on the wire as Flower pushes it: the deflated size of every
    distinct object under it (records, arrays, their <= 5 MiB chunks), as in
    flwr.superlink.grid.http_grid / flwr.supernode.runtime.run_clientapp push_message,
    before HTTP and TLS framing and without the Message's own few hundred bytes of metadata.
    Identical objects count once, as Flower sends them once per message."""
    with no_object_id_recompute():  # as Flower's push: each object id is hashed once
        return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def _records(content: object, what: str) -> Mapping[str, object]:
    if not isinstance(content, RecordDict):
        raise WireError(f"{what}: a {type(content).__name__}, expected a RecordDict")
    return dict(content.items())


def _typed(records: Mapping[str, object], name: str, kind: type) -> object:
    record = records[name]
    if not isinstance(record, kind):
        raise WireError(f"{name}: a {type(record).__name__}, expected a {kind.__name__}")
    return record


def _reader(record: Mapping[str, object], what: str) -> Callable[[str, type], Any]:
    """get(key, kind): the record's value at `key` if it is exactly of type `kind` (an int
    is not a float, a bool is neither), else WireError naming `what.key`."""

    def get(key: str, kind: type) -> Any:
        value = record[key]
        if type(value) is not kind:
            raise WireError(f"{what}.{key}: a {type(value).__name__}, expected {kind.__name__}")
        return value

    return get


def _exact(found: Iterable[str], expected: Iterable[str], what: str) -> None:
    found, expected = set(found), set(expected)
    if expected - found:
        raise WireError(f"{what}: missing {_listed(expected - found)}")
    if found - expected:
        raise WireError(f"{what}: unexpected {_listed(found - expected)}")


def _listed(names: Iterable[str]) -> str:
    """Up to three names, each cut to 40 characters: a peer's names go into metrics.jsonl."""
    names = sorted(names)
    shown = ", ".join(repr(name[:40]) for name in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _group_name(name: str, reserved: frozenset[str]) -> str:
    if name in reserved or not GROUP_NAME.fullmatch(name):
        raise ValueError(f"tensor group {name!r}: reserved or not a lower-case identifier")
    return name


def _at_least(value: int, low: int, where: str) -> int:
    if value < low:
        raise WireError(f"{where}: must be >= {low}, got {value}")
    return value


def _one_of(value: str, allowed: Iterable[str], where: str) -> str:
    if value not in allowed:
        raise WireError(f"{where}: {value[:40]!r} is not one of {', '.join(allowed)}")
    return value


def _finite(value: float, where: str) -> float:
    if not math.isfinite(value):
        raise WireError(f"{where}: not finite ({value!r})")
    return value


def _positive(value: float, where: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise WireError(f"{where}: must be a finite number > 0, got {value!r}")
    return value


def _seed(value: int) -> int:
    if not 0 <= value < SEED_LIMIT:
        raise WireError(f"round.seed: must be in [0, 2**64), got {value}")
    return value


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
