"""Secure aggregation's four stages as Flower records (docs/design/deployment.md §7).

Each stage is one message each way with its own message_type; a coordinator message holds
the run header ("run", as every task) and a "secagg" ConfigRecord of the stage's fields;
the masked-input stage adds the round's usual task records ("global", "round"). A reply
holds fedit's "status" record and, when "ok", the stage's own records. As in
fedit.protocol.wire (whose checks these reuse) every field is checked for name, type, length
and range before it is used, and a WireError names the first that is wrong.

Coordinator → owner, the "secagg" record's fields (besides round and client_id):
keys: sampled; shares: neighbours, enc_keys, mask_keys; masked: senders, ciphertexts (and
the task); unmask: survivors, dropped.
Owner → coordinator: keys: "secagg" enc_key, mask_key (32 bytes each); shares: "secagg"
receivers, ciphertexts, b_digest; masked: "masked" vector (uint64) and "metrics"; unmask:
"secagg" b_shares, sk_shares.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.constant import SType

from fedit.deploy.secagg import crypto
from fedit.protocol.wire import (
    GLOBAL,
    METRICS,
    NPY_HEADER_ROOM,
    ROUND,
    RUN,
    STATUS,
    ReplyStatus,
    RunHeader,
    WireError,
    _at_least,
    _exact,
    _reader,
    _records,
    _typed,
    decode_status,
    encode_header,
    ok_status,
)
from fedit.server.validation import non_finite_metric

KEYS, SHARES, MASKED, UNMASK = (
    "train.secagg_keys",
    "train.secagg_shares",
    "train.secagg_masked",
    "train.secagg_unmask",
)
STAGES = (KEYS, SHARES, MASKED, UNMASK)
SECAGG, VECTOR_RECORD, VECTOR = "secagg", "masked", "vector"
COMMON = ("round", "client_id")
REQUEST_FIELDS = {
    KEYS: (*COMMON, "sampled"),
    SHARES: (*COMMON, "neighbours", "enc_keys", "mask_keys"),
    MASKED: (*COMMON, "senders", "ciphertexts"),
    UNMASK: (*COMMON, "survivors", "dropped"),
}
REPLY_FIELDS = {
    KEYS: ("enc_key", "mask_key"),
    SHARES: ("receivers", "ciphertexts", "b_digest"),
    UNMASK: ("b_shares", "sk_shares"),
}
# A Fernet token of one share plaintext (8 + 8 + 4 + 52 + 52 bytes) is 248 bytes.
MAX_CIPHERTEXT = 512
MAX_CLIENTS = 100_000
DIGEST_BYTES = 32
# The metrics a masked input may carry in plaintext: the loss only (with DPO's accuracy and
# margin); token and step counts or timings would reveal the record count n_k.
SFT_METRICS = frozenset({"train_loss"})
DPO_METRICS = SFT_METRICS | {"dpo_accuracy", "dpo_margin"}


@dataclass(frozen=True)
class Request:
    """A stage message as the owner reads it: the stage, the round, whose it is, and the
    stage's own checked fields."""

    stage: str
    round_number: int
    client_id: int
    fields: dict[str, Any]


def encode_request(stage: str, run: RunHeader, round_number: int, client_id: int, **fields):
    """A coordinator's stage message (MASKED's task records are added by the caller)."""
    record = ConfigRecord({"round": round_number, "client_id": client_id, **fields})
    _exact(record.keys(), REQUEST_FIELDS[stage], SECAGG)
    return RecordDict({RUN: encode_header(run), SECAGG: record})


def decode_request(stage: str, content: object) -> Request:
    """A stage message's "secagg" fields, checked (the run header is checked by the caller
    with wire.decode_header, the masked stage's task by wire.decode_task)."""
    if stage not in STAGES:
        raise WireError(f"message type {stage[:40]!r} is not a secure aggregation stage")
    records = _records(content, "task")
    allowed = {RUN, SECAGG} | ({GLOBAL, ROUND} if stage == MASKED else set())
    _exact(records.keys(), allowed, "task")
    record = _typed(records, SECAGG, ConfigRecord)
    _exact(record.keys(), REQUEST_FIELDS[stage], SECAGG)
    get = _reader(record, SECAGG)
    fields: dict[str, Any] = {}
    if stage == KEYS:
        fields["sampled"] = _in_range(get("sampled", int), 2, MAX_CLIENTS, "secagg.sampled")
    elif stage == SHARES:
        ids = _ids(get("neighbours", list), "secagg.neighbours")
        fields["neighbours"] = ids
        for name in ("enc_keys", "mask_keys"):
            fields[name] = _blobs(get(name, list), len(ids), crypto.KEY_BYTES, f"secagg.{name}")
    elif stage == MASKED:
        ids = _ids(get("senders", list), "secagg.senders")
        fields["senders"] = ids
        fields["ciphertexts"] = _tokens(get("ciphertexts", list), len(ids), "secagg.ciphertexts")
    else:
        fields["survivors"] = _ids(get("survivors", list), "secagg.survivors")
        fields["dropped"] = _ids(get("dropped", list), "secagg.dropped")
        both = set(fields["survivors"]) & set(fields["dropped"])
        if both:
            raise WireError(f"secagg: client {min(both)} is both a survivor and dropped")
    return Request(
        stage,
        _at_least(get("round", int), 1, "secagg.round"),
        _at_least(get("client_id", int), 0, "secagg.client_id"),
        fields,
    )


def task_part(content: RecordDict) -> RecordDict:
    """The masked stage's task records, as wire.decode_task reads them."""
    return RecordDict({name: content[name] for name in (GLOBAL, ROUND, RUN) if name in content})


def encode_reply(stage: str, **fields) -> RecordDict:
    """An owner's "ok" reply to the keys, shares or unmask stage."""
    record = ConfigRecord(fields)
    _exact(record.keys(), REPLY_FIELDS[stage], SECAGG)
    return RecordDict({STATUS: ok_status(), SECAGG: record})


def encode_masked(vector: np.ndarray, metrics: Mapping[str, float]) -> RecordDict:
    """An owner's masked input: its uint64 vector and its plaintext loss metrics."""
    if vector.dtype != np.uint64 or vector.ndim != 1:
        raise ValueError("a masked vector is one uint64 array")
    return RecordDict(
        {
            STATUS: ok_status(),
            VECTOR_RECORD: ArrayRecord({VECTOR: Array.from_numpy_ndarray(vector)}),
            METRICS: MetricRecord(dict(metrics)),
        }
    )


def decode_reply(stage: str, content: object) -> dict[str, Any] | ReplyStatus:
    """The checked fields of an owner's keys / shares / unmask reply (lengths against the
    request are the caller's), or its ReplyStatus."""
    records = _records(content, "reply")
    status = decode_status(records)
    if status is not None:
        return status
    _exact(records.keys(), {STATUS, SECAGG}, "reply")
    record = _typed(records, SECAGG, ConfigRecord)
    _exact(record.keys(), REPLY_FIELDS[stage], SECAGG)
    get = _reader(record, SECAGG)
    if stage == KEYS:
        return {
            name: _blob(get(name, bytes), crypto.KEY_BYTES, f"secagg.{name}")
            for name in REPLY_FIELDS[KEYS]
        }
    if stage == SHARES:
        receivers = _ids(get("receivers", list), "secagg.receivers")
        return {
            "receivers": receivers,
            "ciphertexts": _tokens(get("ciphertexts", list), len(receivers), "secagg.ciphertexts"),
            "b_digest": _blob(get("b_digest", bytes), DIGEST_BYTES, "secagg.b_digest"),
        }
    return {
        name: _blobs(get(name, list), None, crypto.SHARE_BYTES, f"secagg.{name}")
        for name in REPLY_FIELDS[UNMASK]
    }


def decode_masked(
    content: object, length: int, bits: int, objective: str
) -> tuple[np.ndarray, dict[str, float]] | ReplyStatus:
    """(vector, metrics) of a masked-input reply: one uint64 array of `length` entries,
    each below 2**bits, and the loss metrics of `objective` only, finite."""
    records = _records(content, "reply")
    status = decode_status(records)
    if status is not None:
        return status
    _exact(records.keys(), {STATUS, VECTOR_RECORD, METRICS}, "reply")
    arrays = _typed(records, VECTOR_RECORD, ArrayRecord)
    _exact(arrays.keys(), {VECTOR}, VECTOR_RECORD)
    array, where = arrays[VECTOR], f"{VECTOR_RECORD}.{VECTOR}"
    if array.stype != SType.NUMPY or array.dtype != "uint64" or tuple(array.shape) != (length,):
        raise WireError(
            f"{where}: {array.dtype[:20]} {tuple(array.shape)[:3]}, expected uint64 ({length},)"
        )
    if len(array.data) > 8 * length + NPY_HEADER_ROOM:
        raise WireError(f"{where}: {len(array.data)} bytes, too many for its shape")
    try:
        vector = array.numpy()
    except (ValueError, OSError, EOFError) as err:
        raise WireError(f"{where}: not a readable .npy array ({type(err).__name__})") from None
    if vector.dtype != np.uint64 or vector.shape != (length,):
        raise WireError(f"{where}: its bytes hold {vector.dtype} {vector.shape}, not uint64")
    if length and int(vector.max()) >= 2**bits:
        raise WireError(f"{where}: an entry is not below 2**{bits}")
    metrics = _typed(records, METRICS, MetricRecord)
    _exact(metrics.keys(), DPO_METRICS if objective == "dpo" else SFT_METRICS, METRICS)
    problem = non_finite_metric(metrics)
    if problem is not None:
        raise WireError(f"metrics: {problem}")
    return np.ascontiguousarray(vector), dict(metrics)


def _in_range(value: int, low: int, high: int, where: str) -> int:
    if not low <= value <= high:
        raise WireError(f"{where}: must be in [{low}, {high}], got {value}")
    return value


def _ids(value: list, where: str) -> list[int]:
    if len(value) > MAX_CLIENTS or any(type(v) is not int or v < 0 for v in value):
        raise WireError(f"{where}: must be a list of client ids (ints >= 0)")
    if len(set(value)) != len(value):
        raise WireError(f"{where}: a client id appears twice")
    return list(value)


def _blob(value: bytes, length: int, where: str) -> bytes:
    if len(value) != length:
        raise WireError(f"{where}: {len(value)} bytes, expected {length}")
    return value


def _blobs(value: list, count: int | None, length: int, where: str) -> list[bytes]:
    if count is not None and len(value) != count:
        raise WireError(f"{where}: {len(value)} entries, expected {count}")
    if len(value) > MAX_CLIENTS or any(type(v) is not bytes for v in value):
        raise WireError(f"{where}: must be a list of bytes")
    return [_blob(v, length, f"{where}[{i}]") for i, v in enumerate(value)]


def _tokens(value: list, count: int, where: str) -> list[bytes]:
    if len(value) != count:
        raise WireError(f"{where}: {len(value)} entries, expected {count}")
    if any(type(v) is not bytes or not 0 < len(v) <= MAX_CIPHERTEXT for v in value):
        raise WireError(f"{where}: must be ciphertexts of at most {MAX_CIPHERTEXT} bytes")
    return list(value)
