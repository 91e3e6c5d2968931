"""Secure aggregation's stage messages (fedit.deploy.secagg.stages): round trips through
Flower's serialisation, and every malformed field refused with a reason naming it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="the stage messages are Flower records")

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from fedit.deploy.secagg import stages as sw
from fedit.protocol.wire import ReplyStatus, RunHeader, WireError, encode_status, encode_task
from fedit.types import ClientTask

HEADER = RunHeader.of("seed = 1\n", "ab" * 32)
KEY = bytes(range(32))
SHARE = bytes(52)


def carried(content: RecordDict) -> RecordDict:
    return recorddict_from_proto(recorddict_to_proto(content))


def with_task(request: RecordDict) -> RecordDict:
    """The masked stage's message: the round's task and the stage's record."""
    task = ClientTask(2, 1, "sft", 0.1, 7)
    content = encode_task(task, {"a": torch.zeros(2)}, HEADER)
    content["secagg"] = request["secagg"]
    return content


def requests() -> dict[str, RecordDict]:
    return {
        sw.KEYS: sw.encode_request(sw.KEYS, HEADER, 2, 1, sampled=3),
        sw.SHARES: sw.encode_request(
            sw.SHARES, HEADER, 2, 1, neighbours=[0, 2], enc_keys=[KEY, KEY], mask_keys=[KEY, KEY]
        ),
        sw.MASKED: with_task(
            sw.encode_request(sw.MASKED, HEADER, 2, 1, senders=[2], ciphertexts=[b"t" * 248])
        ),
        sw.UNMASK: sw.encode_request(sw.UNMASK, HEADER, 2, 1, survivors=[1, 2], dropped=[]),
    }


def test_every_stage_request_round_trips() -> None:
    decoded = {stage: sw.decode_request(stage, carried(c)) for stage, c in requests().items()}
    assert decoded[sw.KEYS].fields == {"sampled": 3}
    assert decoded[sw.SHARES].fields["neighbours"] == [0, 2]
    assert decoded[sw.MASKED].fields["ciphertexts"] == [b"t" * 248]
    assert set(sw.task_part(requests()[sw.MASKED]).keys()) == {"global", "round", "run"}
    assert decoded[sw.UNMASK].fields == {"survivors": [1, 2], "dropped": []}
    assert {(r.round_number, r.client_id) for r in decoded.values()} == {(2, 1)}


def changed(
    source: Callable[[], dict[str, RecordDict]], stage: str, key: str, value
) -> Callable[[], RecordDict]:
    """source()[stage] with its "secagg" record's `key` set to `value`."""

    def build() -> RecordDict:
        content = source()[stage]
        content["secagg"][key] = value
        return content

    return build


def field(stage: str, key: str, value) -> Callable[[], RecordDict]:
    return changed(requests, stage, key, value)


@pytest.mark.parametrize(
    "stage, build, reason",
    [
        (sw.KEYS, field(sw.KEYS, "sampled", 1), r"secagg\.sampled: must be in \[2, "),
        (sw.KEYS, field(sw.KEYS, "sampled", 3.0), r"secagg\.sampled: a float, expected int"),
        (sw.KEYS, field(sw.KEYS, "round", 0), r"secagg\.round: must be >= 1"),
        (sw.KEYS, field(sw.KEYS, "extra", 1), r"secagg: unexpected 'extra'"),
        (
            sw.SHARES,
            field(sw.SHARES, "neighbours", [0, 0]),
            r"neighbours: a client id appears twice",
        ),
        (
            sw.SHARES,
            field(sw.SHARES, "neighbours", [-1, 2]),
            r"neighbours: must be a list of client",
        ),
        (sw.SHARES, field(sw.SHARES, "enc_keys", [KEY]), r"enc_keys: 1 entries, expected 2"),
        (sw.SHARES, field(sw.SHARES, "mask_keys", [KEY, KEY[:31]]), r"mask_keys\[1\]: 31 bytes"),
        (sw.MASKED, field(sw.MASKED, "ciphertexts", [b"t" * 600]), r"ciphertexts: must be cipher"),
        (sw.MASKED, field(sw.MASKED, "senders", [2, 3]), r"ciphertexts: 1 entries, expected 2"),
        (sw.UNMASK, field(sw.UNMASK, "dropped", [2]), r"client 2 is both a survivor and dropped"),
        (sw.UNMASK, lambda: requests()[sw.KEYS], r"secagg: missing 'dropped', 'survivors'"),
        ("train", lambda: requests()[sw.KEYS], r"not a secure aggregation stage"),
        (sw.KEYS, lambda: requests()[sw.UNMASK], r"secagg: missing 'sampled'"),
        (sw.KEYS, lambda: requests()[sw.MASKED], r"task: unexpected 'global', 'round'"),
    ],
)
def test_malformed_requests_are_refused_with_the_field(stage, build, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        sw.decode_request(stage, carried(build()))


def test_an_unexpected_record_in_a_request_is_refused() -> None:
    content = requests()[sw.KEYS]
    content["global"] = ArrayRecord()
    with pytest.raises(WireError, match="task: unexpected 'global'"):
        sw.decode_request(sw.KEYS, content)


def replies() -> dict[str, RecordDict]:
    return {
        sw.KEYS: sw.encode_reply(sw.KEYS, enc_key=KEY, mask_key=KEY),
        sw.SHARES: sw.encode_reply(
            sw.SHARES, receivers=[0, 2], ciphertexts=[b"x" * 248] * 2, b_digest=bytes(32)
        ),
        sw.UNMASK: sw.encode_reply(sw.UNMASK, b_shares=[SHARE, SHARE], sk_shares=[]),
    }


def test_replies_round_trip_and_statuses_pass_through() -> None:
    for stage, content in replies().items():
        assert isinstance(sw.decode_reply(stage, carried(content)), dict)
    refused = sw.decode_reply(sw.KEYS, carried(encode_status("refused", "no")))
    assert refused == ReplyStatus("refused", "no")
    vector = np.array([0, 5, 2**20 - 1], dtype=np.uint64)
    got, metrics = sw.decode_masked(
        carried(sw.encode_masked(vector, {"train_loss": 1.5})), 3, 20, "sft"
    )
    assert np.array_equal(got, vector) and metrics == {"train_loss": 1.5}


def reply_field(stage: str, key: str, value) -> Callable[[], RecordDict]:
    return changed(replies, stage, key, value)


@pytest.mark.parametrize(
    "stage, build, reason",
    [
        (sw.KEYS, reply_field(sw.KEYS, "enc_key", KEY + b"x"), r"secagg\.enc_key: 33 bytes"),
        (sw.KEYS, reply_field(sw.KEYS, "mask_key", "k" * 32), r"mask_key: a str, expected bytes"),
        (sw.SHARES, reply_field(sw.SHARES, "ciphertexts", [b"x"]), r"ciphertexts: 1 entries"),
        (sw.SHARES, reply_field(sw.SHARES, "b_digest", b""), r"b_digest: 0 bytes, expected 32"),
        (sw.UNMASK, reply_field(sw.UNMASK, "b_shares", [SHARE[:51]]), r"b_shares\[0\]: 51 bytes"),
        (
            sw.UNMASK,
            reply_field(sw.UNMASK, "sk_shares", [1]),
            r"sk_shares: must be a list of bytes",
        ),
        (sw.KEYS, lambda: RecordDict({"secagg": ConfigRecord({})}), r"reply: no status record"),
    ],
)
def test_malformed_replies_are_refused_with_the_field(stage, build, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        sw.decode_reply(stage, carried(build()))


def masked(change: Callable[[RecordDict], None]) -> RecordDict:
    content = sw.encode_masked(np.arange(4, dtype=np.uint64), {"train_loss": 0.5})
    change(content)
    return content


@pytest.mark.parametrize(
    "change, reason",
    [
        (
            lambda c: c["masked"].__setitem__("vector", Array(np.arange(4, dtype=np.int64))),
            r"masked\.vector: int64 \(4,\), expected uint64 \(4,\)",
        ),
        (
            lambda c: c["masked"].__setitem__("vector", Array(np.arange(5, dtype=np.uint64))),
            r"masked\.vector: uint64 \(5,\)",
        ),
        (
            lambda c: c["masked"].__setitem__("vector", Array(np.full(4, 2**20, np.uint64))),
            r"masked\.vector: an entry is not below 2\*\*20",
        ),
        (
            lambda c: c["metrics"].__setitem__("real_tokens", 10),
            r"metrics: unexpected 'real_tokens'",
        ),
        (lambda c: c["metrics"].__setitem__("train_loss", float("nan")), r"metrics: "),
        (lambda c: c.__setitem__("update", ArrayRecord()), r"reply: unexpected 'update'"),
        (lambda c: c.__setitem__("metrics", ConfigRecord({})), r"metrics: a ConfigRecord"),
    ],
)
def test_malformed_masked_inputs_are_refused_with_the_field(change, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        sw.decode_masked(carried(masked(change)), 4, 20, "sft")


def test_masked_metrics_are_the_losses_only() -> None:
    """Token and step counts or timings would tell the coordinator n_k."""
    assert {"train_loss"} == sw.SFT_METRICS
    assert {"train_loss", "dpo_accuracy", "dpo_margin"} == sw.DPO_METRICS
    dpo = sw.encode_masked(
        np.zeros(2, np.uint64), {"train_loss": 1.0, "dpo_accuracy": 0.5, "dpo_margin": 0.1}
    )
    assert sw.decode_masked(carried(dpo), 2, 20, "dpo")[1]["dpo_margin"] == 0.1
    with pytest.raises(WireError, match="metrics: unexpected"):
        sw.decode_masked(carried(dpo), 2, 20, "sft")
    assert isinstance(MetricRecord({"train_loss": 1.0}), MetricRecord)


def test_owners_get_the_secagg_parameters_but_not_the_coordinators_waiting() -> None:
    """The header (and so each owner's loaded session) must not change when a resume
    changes secagg.stage_timeout; bits, clip range, k and t are the owners' to check."""
    import tomllib

    from fedit.config import load_config
    from fedit.protocol.traffic import owners_config

    cfg = load_config(None, ["data.path=synthetic", "secagg.enabled=true", "secagg.bits=24"])
    sent = tomllib.loads(owners_config(cfg))["secagg"]
    assert sent["bits"] == 24 and sent["enabled"] is True
    assert "stage_timeout" not in sent
