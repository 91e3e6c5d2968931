"""fedit's messages as Flower records: bitwise round trips through Flower's own
serialisation, the exact structure decoding demands, and the bytes a message costs."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents, push_objects
from transformers import AutoTokenizer

from fedit.client.dpo_trainer import train_client_dpo
from fedit.client.feedback import UploadCompressor
from fedit.client.trainer import train_client
from fedit.config import CompressionConfig, DPOConfig, LoraConfig, ModelConfig, TrainConfig
from fedit.data.preferences import synthetic_pairs, tokenize_pairs
from fedit.data.synthetic import generate_records
from fedit.data.tokenize import tokenize_records
from fedit.models.adapters import attach_lora
from fedit.models.loading import load_model
from fedit.protocol import wire
from fedit.protocol.wire import ReplyStatus, RunHeader, WireError
from fedit.types import ClientInstructions, ClientTask, ClientUpdate

FINGERPRINT = "ab" * 32
SHAPES = {"q.lora_A": (2, 3), "q.lora_B": (4, 2)}


def adapter(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 tensors of SHAPES, with the values a lossy path would change."""
    generator = torch.Generator().manual_seed(seed)
    state = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    state["q.lora_A"][0] = torch.tensor([-0.0, 1e-45, torch.finfo(torch.float32).max])
    return state


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype == torch.float32
        and torch.equal(a[k].view(torch.int32), b[k].view(torch.int32))
        for k in a
    )


def scaffold_task() -> ClientTask:
    instructions = ClientInstructions(
        hook="scaffold",
        scalars={"prox_mu": 0.01},
        tensors={"c": adapter(1), "c_k": adapter(2)},
    )
    return ClientTask(3, 2, "sft", 1.5e-4, 2**64 - 1, instructions)


def run_header() -> RunHeader:
    return RunHeader.of('seed = 1\n[data]\npath = ""\n', FINGERPRINT)


def over_the_wire(content: RecordDict) -> tuple[dict[str, bytes], str, RecordDict]:
    """Flower's own path for a Message carrying `content`: the deflated objects its push
    sends (by object id), the Message's id, and the content the receiver inflates."""
    metadata = Metadata(1, "", 1, 2, "", "3", 0.0, 60.0, "train")
    message = Message(content=content, metadata=metadata)
    with no_object_id_recompute():
        message_id = message.object_id
        objects = get_all_nested_objects(message)
    pushed: dict[str, bytes] = {}
    push_objects(objects, pushed.__setitem__)
    received = inflate_object_from_contents(message_id, dict(pushed))
    return pushed, message_id, received.content


def test_a_task_round_trips_bitwise_through_flowers_serialisation() -> None:
    task, state, header = scaffold_task(), adapter(), run_header()
    _, _, received = over_the_wire(wire.encode_task(task, state, header))
    assert wire.decode_header(received) == header
    got_task, got_state, held = wire.decode_task(received, SHAPES)
    assert bitwise_equal(got_state, state)
    assert held == {}
    assert got_task.instructions.tensors.keys() == {"c", "c_k"}
    for group in ("c", "c_k"):
        assert bitwise_equal(got_task.instructions.tensors[group], task.instructions.tensors[group])
    got_task.instructions.tensors = task.instructions.tensors = {}
    assert got_task == task  # every field, the 64-bit seed and the float scalars exactly


def test_a_trained_update_round_trips_bitwise() -> None:
    metrics = dict.fromkeys(wire.SFT_METRICS, 2) | {"train_loss": 0.25}
    update = ClientUpdate(0, adapter(3), 12, 4, 0.1, {"control_delta": adapter(4)}, metrics)
    _, _, received = over_the_wire(wire.encode_reply(update))
    got = wire.decode_reply(received, 5, SHAPES, {"control_delta"}, 0.125)
    assert isinstance(got, ClientUpdate)
    assert (got.client_id, got.learning_rate) == (5, 0.125)  # the coordinator's, not sent
    assert (got.num_examples, got.num_steps, got.metrics) == (12, 4, update.metrics)
    assert type(got.metrics["steps"]) is int
    assert bitwise_equal(got.state, update.state)
    assert bitwise_equal(got.extras["control_delta"], update.extras["control_delta"])


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.zeros(2, 3, dtype=torch.float64), "torch.float64 on cpu"),
        (torch.zeros(2, 3, dtype=torch.bfloat16), "torch.bfloat16 on cpu"),
        (torch.zeros(2, 3, dtype=torch.float16), "torch.float16 on cpu"),
        (torch.zeros(3, 2).T, "not contiguous"),
        (torch.zeros(2, 3, device="meta"), "torch.float32 on meta"),
    ],
)
def test_encode_refuses_anything_but_contiguous_float32_on_the_cpu(tensor, message) -> None:
    with pytest.raises(ValueError, match=rf"^w: {message}"):
        wire.encode_state({"w": tensor})


def npy(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def good_array() -> Array:
    return Array.from_numpy_ndarray(np.ones((2, 3), dtype=np.float32))


def record(arrays: dict[str, Array] | None = None) -> ArrayRecord:
    """A record of SHAPES' tensors, with `arrays` replacing some or added."""
    clean = wire.encode_state({name: torch.ones(shape) for name, shape in SHAPES.items()})
    for name, array in (arrays or {}).items():
        clean[name] = array
    return clean


def with_a(array: Array) -> ArrayRecord:
    return record({"q.lora_A": array})


def declared(data: bytes, dtype: str = "float32", stype: str = "numpy.ndarray") -> Array:
    """An Array of shape (2, 3) as a peer may declare it, whatever its bytes hold."""
    return Array(dtype, (2, 3), stype, data)


def lacking(name: str) -> ArrayRecord:
    clean = record()
    del clean[name]
    return clean


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (lacking("q.lora_B"), "update: missing 'q.lora_B'"),
        (record({"extra": good_array()}), "update: unexpected 'extra'"),
        (with_a(Array(np.ones((3, 2), np.float32))), "update q.lora_A: shape (3, 2), expected"),
        (with_a(Array(np.ones((2, 3)))), "update q.lora_A: dtype 'float64', expected float32"),
        (with_a(declared(b"\0" * 12, "bfloat16")), "update q.lora_A: dtype 'bfloat16'"),
        (
            with_a(declared(npy(np.ones((2, 3), np.uint16)))),  # bfloat16 bits sent as float32
            "update q.lora_A: its bytes hold uint16 (2, 3), not float32",
        ),
        (
            with_a(declared(npy(np.ones((3, 2), np.float32)))),
            "update q.lora_A: its bytes hold float32 (3, 2)",
        ),
        (with_a(declared(b"x", stype="torch.save")), "update q.lora_A: serialised as 'torch.save'"),
        (with_a(declared(b"garbage")), "update q.lora_A: not a readable .npy array"),
        (with_a(declared(b"\0" * 2000)), "update q.lora_A: 2000 bytes, too many for its"),
        (with_a(Array(np.full((2, 3), np.nan, np.float32))), "update q.lora_A: non-finite values"),
        (
            record({"q.lora_B": Array(np.full((4, 2), -np.inf, np.float32))}),
            "update q.lora_B: non-finite values",
        ),
        (MetricRecord({"x": 1}), "update: a MetricRecord, expected an ArrayRecord"),
    ],
)
def test_decode_state_demands_exactly_the_expected_tensors(bad: object, reason: str) -> None:
    with pytest.raises(WireError) as err:
        wire.decode_state(bad, SHAPES, "update")
    assert str(err.value).startswith(reason)


def test_decode_state_gives_writable_contiguous_tensors_in_the_expected_order() -> None:
    fortran = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    arrays = with_a(declared(npy(fortran)))
    state = wire.decode_state(arrays, {"q.lora_B": (4, 2), "q.lora_A": (2, 3)}, "update")
    assert list(state) == ["q.lora_B", "q.lora_A"]
    assert state["q.lora_A"].is_contiguous()
    assert state["q.lora_A"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    state["q.lora_A"] += 1  # writable: np.load gave a fresh array, not a view of the bytes


def task_with(change: Callable[[RecordDict], None]) -> RecordDict:
    content = wire.encode_task(scaffold_task(), adapter(), run_header())
    change(content)
    return content


def set_round(key: str, value: object) -> Callable[[RecordDict], None]:
    return lambda content: content["round"].__setitem__(key, value)


def drop(record_name: str, key: str | None = None) -> Callable[[RecordDict], None]:
    if key is None:
        return lambda content: content.__delitem__(record_name)
    return lambda content: content[record_name].__delitem__(key)


def put(name: str, value: object) -> Callable[[RecordDict], None]:
    return lambda content: content.__setitem__(name, value)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (set_round("round", 0), "round.round: must be >= 1, got 0"),
        (set_round("round", True), "round.round: a bool, expected int"),
        (set_round("round", 2.0), "round.round: a float, expected int"),
        (set_round("client_id", -1), "round.client_id: must be >= 0, got -1"),
        (set_round("objective", "sft_then_dpo"), "round.objective: 'sft_then_dpo' is not one of"),
        (set_round("learning_rate", 0.0), "round.learning_rate: must be a finite number > 0"),
        (set_round("learning_rate", -1e-3), "round.learning_rate: must be a finite number > 0"),
        (set_round("learning_rate", float("nan")), "round.learning_rate: must be a finite"),
        (set_round("learning_rate", float("inf")), "round.learning_rate: must be a finite"),
        (set_round("learning_rate", 1), "round.learning_rate: a int, expected float"),
        (set_round("seed", -1), "round.seed: must be in [0, 2**64), got -1"),
        (set_round("seed", "42"), "round.seed: a str, expected int"),
        (set_round("hook", "fedopt"), "round.hook: 'fedopt' is not one of none, fedprox, scaffold"),
        (set_round("scalar.prox_mu", float("nan")), "round.scalar.prox_mu: not finite (nan)"),
        (set_round("scalar.prox_mu", "0.1"), "round.scalar.prox_mu: a str, expected float"),
        (set_round("num_clients", 3), "round: unexpected 'num_clients'"),
        (set_round("feedback_round", -1), "round.feedback_round: must be >= 0, got -1"),
        (set_round("feedback_round", 3), "round.feedback_round: 3, not before round 3"),
        (drop("round", "seed"), "round: missing 'seed'"),
        (drop("run"), "task: no 'run' record"),
        (drop("global"), "task: no 'global' record"),
        (put("Bad Name", ArrayRecord()), "task: unexpected record 'Bad Name'"),
        (put("c", MetricRecord({"x": 1.0})), "c: a MetricRecord, expected an ArrayRecord"),
        (put("round", ArrayRecord()), "round: a ArrayRecord, expected a ConfigRecord"),
        (drop("c_k", "q.lora_A"), "c_k: missing 'q.lora_A'"),
        (drop("global", "q.lora_B"), "global: missing 'q.lora_B'"),
        (
            lambda c: c["run"].__setitem__("config_toml", "seed = 2\n"),
            "run.config_sha256: not the sha256 of run.config_toml",
        ),
        (
            lambda c: c["run"].__setitem__("base_fingerprint", "not-a-digest"),
            "run.base_fingerprint: not a sha256 hex digest",
        ),
        (lambda c: c["run"].__setitem__("extra", "x"), "run: unexpected 'extra'"),
    ],
)
def test_decode_task_names_the_field_that_is_wrong(change, reason: str) -> None:
    with pytest.raises(WireError) as err:
        wire.decode_task(task_with(change), SHAPES)
    assert str(err.value).startswith(reason)


def test_a_held_group_goes_by_digest_and_comes_back_named() -> None:
    """SCAFFOLD's c_k stays on the owner: the task names the version by digest instead."""
    task = scaffold_task()
    digest = wire.state_digest(task.instructions.tensors["c_k"])
    content = wire.encode_task(task, adapter(), run_header(), held={"c_k": digest})
    assert "c_k" not in content and content["round"]["held.c_k"] == digest
    _, _, received = over_the_wire(content)
    got, _, held = wire.decode_task(received, SHAPES)
    assert held == {"c_k": digest}
    assert got.instructions.tensors.keys() == {"c"}
    full = wire.encode_task(task, adapter(), run_header())  # a re-send: c_k in full
    assert wire.content_bytes(full) > wire.content_bytes(content)


def test_state_digest_names_the_tensors_exactly() -> None:
    state = adapter()
    digest = wire.state_digest(state)
    assert wire.state_digest(dict(reversed(state.items()))) == digest  # order-free
    assert wire.state_digest({k: v.clone() for k, v in state.items()}) == digest
    nudged = {k: v.clone() for k, v in state.items()}
    nudged["q.lora_B"][0, 0] = torch.nextafter(nudged["q.lora_B"][0, 0], torch.tensor(9.0))
    renamed = {"x" + k: v for k, v in state.items()}
    reshaped = {k: v.reshape(-1) for k, v in state.items()}
    doubled = {k: v.double() for k, v in state.items()}
    others = [wire.state_digest(s) for s in (nudged, renamed, reshaped, doubled)]
    assert len({digest, *others}) == 5


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (set_round("held.c", "ab" * 32), "round.held.c: 'c' is both sent and held"),
        (set_round("held.c_k", "not hex"), "round.held.c_k: not a sha256 hex digest"),
        (set_round("held.c_k", 3), "round.held.c_k: a int, expected str"),
        (set_round("held.Bad", "ab" * 32), "round: unexpected 'held.Bad'"),
        (set_round("held.round", "ab" * 32), "round: unexpected 'held.round'"),
    ],
)
def test_held_digests_are_checked(change, reason: str) -> None:
    with pytest.raises(WireError) as err:
        wire.decode_task(task_with(change), SHAPES)
    assert str(err.value).startswith(reason)


def test_decode_header_is_checked_before_the_tensors_are() -> None:
    content = task_with(drop("global"))  # the owner reads the header before its shapes
    assert wire.decode_header(content) == run_header()
    with pytest.raises(WireError, match="task: no 'run' record"):
        wire.decode_header(task_with(drop("run")))
    with pytest.raises(WireError, match="run.config_sha256: not the sha256"):
        wire.decode_header(task_with(lambda c: c["run"].__setitem__("config_sha256", "0" * 64)))


def test_decode_task_refuses_what_is_not_a_record_dict() -> None:
    with pytest.raises(WireError, match="task: a NoneType, expected a RecordDict"):
        wire.decode_task(None, SHAPES)


def test_encode_task_refuses_a_tensor_group_named_like_a_record() -> None:
    task = scaffold_task()
    task.instructions.tensors = {"round": adapter()}
    with pytest.raises(ValueError, match="tensor group 'round': reserved"):
        wire.encode_task(task, adapter(), run_header())


def ok_reply(change: Callable[[RecordDict], None] | None = None) -> RecordDict:
    metrics = dict.fromkeys(wire.SFT_METRICS, 1.0)
    update = ClientUpdate(0, adapter(), 10, 3, 0.1, {"control_delta": adapter(1)}, metrics)
    content = wire.encode_reply(update)
    if change is not None:
        change(content)
    return content


def in_record(name: str, key: str, value: object) -> Callable[[RecordDict], None]:
    return lambda content: content[name].__setitem__(key, value)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (put("reference", wire.encode_state(adapter())), "reply: unexpected 'reference'"),
        (drop("control_delta"), "reply: missing 'control_delta'"),
        (drop("metrics"), "reply: missing 'metrics'"),
        (drop("status"), "reply: no status record"),
        (in_record("update", "extra", good_array()), "update: unexpected 'extra'"),
        (drop("update", "q.lora_A"), "update: missing 'q.lora_A'"),
        (
            in_record("update", "q.lora_A", Array.from_numpy_ndarray(np.ones((2, 3)))),
            "update q.lora_A: dtype 'float64', expected float32",
        ),
        (
            in_record("control_delta", "q.lora_B", Array.from_numpy_ndarray(np.ones(8, "f4"))),
            "control_delta q.lora_B: shape (8,), expected (4, 2)",
        ),
        (
            in_record(
                "update", "q.lora_A", Array.from_numpy_ndarray(np.full((2, 3), np.nan, "f4"))
            ),
            "update q.lora_A: non-finite values",
        ),
        (in_record("counts", "num_examples", 10.0), "counts.num_examples: a float, expected int"),
        (in_record("counts", "num_steps", [3]), "counts.num_steps: a list, expected int"),
        (in_record("counts", "weight", 1), "counts: unexpected 'weight'"),
        (in_record("metrics", "secret", 1.0), "metrics: unexpected 'secret'"),
        (drop("metrics", "seconds"), "metrics: missing 'seconds'"),
        (in_record("metrics", "dpo_margin", 0.5), "metrics: missing 'dpo_accuracy'"),
        (in_record("metrics", "train_loss", float("nan")), "metrics: metric train_loss is not"),
        (in_record("metrics", "steps", [1, 2]), "metrics: metric steps is not a number (list)"),
        (in_record("status", "outcome", "great"), "status.outcome: 'great' is not one of ok,"),
        (in_record("status", "reason", "x" * 201), "status.reason: longer than 200 characters"),
        (in_record("status", "client_id", 3), "status: unexpected 'client_id'"),
        (put("status", MetricRecord({"outcome": 1})), "status: a MetricRecord, expected a"),
        (in_record("status", "outcome", "refused"), "reply: unexpected 'control_delta', "),
    ],
)
def test_decode_reply_demands_exactly_the_expected_structure(change, reason: str) -> None:
    with pytest.raises(WireError) as err:
        wire.decode_reply(ok_reply(change), 0, SHAPES, {"control_delta"}, 0.1)
    assert str(err.value).startswith(reason)


def test_a_reply_without_update_decodes_to_its_status() -> None:
    for outcome in wire.OUTCOMES:
        _, _, received = over_the_wire(wire.encode_status(outcome, "because " + "x" * 300))
        status = wire.decode_reply(received, 0, SHAPES, {"control_delta"}, 0.1)
        assert status == ReplyStatus(outcome, ("because " + "x" * 300)[:200])
    with pytest.raises(ValueError, match="unknown reply outcome 'ok'"):
        wire.encode_status("ok", "")
    assert wire.decode_reply(ok_reply(), 0, SHAPES, {"control_delta"}, 0.1).num_steps == 3


def test_content_bytes_is_what_flower_pushes_for_the_content() -> None:
    big = {"w": torch.arange(1_500_000, dtype=torch.float32)}  # 6 MB: two 5 MiB chunks
    zeros = {"w": torch.zeros(1_500_000)}
    task = ClientTask(1, 0, "sft", 0.1, 7, ClientInstructions("scaffold", {}, {"c": zeros}))
    contents = [
        wire.encode_task(task, big, run_header()),
        wire.encode_task(task, zeros, run_header()),  # "global" and "c" equal: sent once
        wire.encode_reply(ClientUpdate(0, adapter(), 3, 1, 0.1, {}, {"train_loss": 0.5})),
        wire.encode_status("refused", "the base model differs"),
    ]
    for content in contents:
        pushed, message_id, _ = over_the_wire(content)
        # everything Flower pushes for the Message but the Message's own metadata object
        assert wire.content_bytes(content) == sum(map(len, pushed.values())) - len(
            pushed[message_id]
        )
    big_bytes, zeros_bytes = (wire.content_bytes(c) for c in contents[:2])
    assert big_bytes > 2 * 6_000_000 > zeros_bytes > 6_000_000


@pytest.fixture
def tiny_peft(tiny_model_dir: Path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model runs fastest on one thread
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    yield attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    torch.set_num_threads(threads)


def test_the_metric_sets_are_what_the_trainers_report(tiny_peft, tiny_model_dir: Path) -> None:
    """decode_reply accepts exactly these keys: a trainer reporting a new metric must add it
    to the wire's sets, or every deployed reply would be rejected."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = generate_records(2, seed=0, skills=["addition"])
    examples = tokenize_records(records, tokenizer, "alpaca", 512)[0]
    cfg = TrainConfig(micro_batch_size=2, grad_accum_steps=1, max_steps=1, mixed_precision="off")
    common = {"client_id": 0, "learning_rate": 1e-3, "seed": 1, "pad_id": tokenizer.pad_token_id}
    sft = train_client(tiny_peft, examples, cfg, **common)
    raw = [p for p in synthetic_pairs(2, seed=0) if p.category == "addition"]
    pairs = tokenize_pairs(raw, tokenizer, 64, 96, lambda p: f"Q: {p.prompt}\nA: ")[0]
    dpo = train_client_dpo(tiny_peft, pairs, cfg, DPOConfig(), **common)
    assert set(sft.metrics) == wire.SFT_METRICS
    assert set(dpo.metrics) == wire.DPO_METRICS
    shapes = wire.shapes_of(sft.state)
    for update in (sft, dpo):  # what the trainers return is what the wire carries
        got = wire.decode_reply(wire.encode_reply(update), 0, shapes, set(), 1e-3)
        assert got.metrics == update.metrics and bitwise_equal(got.state, update.state)


# --- compressed uploads ---------------------------------------------------------------


def plain_adapter() -> dict[str, torch.Tensor]:
    """Random tensors of SHAPES without adapter()'s extremes (x + Δ must stay finite)."""
    generator = torch.Generator().manual_seed(9)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def compressed_update(codec: str, x: dict[str, torch.Tensor]) -> ClientUpdate:
    """An update as a compressing client sends it (fedit.client.feedback)."""
    y = {k: v + 0.01 * w for (k, v), w in zip(x.items(), adapter(7).values(), strict=True)}
    metrics = dict.fromkeys(wire.SFT_METRICS, 1.0)
    update = ClientUpdate(0, y, 10, 3, 0.1, {}, metrics)
    config = CompressionConfig(upload=codec, topk_fraction=0.5, error_feedback=False)
    return UploadCompressor(config, None).apply(update, x, ClientTask(1, 0, "sft", 0.1, 0))


@pytest.mark.parametrize("codec", ["bf16", "int8", "topk"])
def test_a_compressed_update_arrives_as_the_client_computed_it(codec: str) -> None:
    x = plain_adapter()
    update = compressed_update(codec, x)
    _, _, received = over_the_wire(wire.encode_reply(update))
    upload = wire.UploadCodec(codec, 0.5, x)
    got = wire.decode_reply(received, 0, SHAPES, set(), 0.1, upload)
    assert isinstance(got, ClientUpdate)
    assert bitwise_equal(got.state, update.state)  # the simulation aggregates the same bits
    plain = replace(update, encoded=None)
    assert wire.content_bytes(wire.encode_reply(update)) < wire.content_bytes(
        wire.encode_reply(plain)
    )


def int8_reply(change: Callable[[RecordDict], None]) -> RecordDict:
    content = wire.encode_reply(compressed_update("int8", plain_adapter()))
    change(content)
    return content


def minus_128_in_lora_b() -> Array:
    q = np.ones(14, "i1")  # q.lora_A's 6 entries, then q.lora_B's 8 (sorted names)
    q[9] = -128
    return Array.from_numpy_ndarray(q)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (drop("update", "scale"), "update: missing 'scale'"),
        (in_record("update", "q.lora_A", good_array()), "update: unexpected 'q.lora_A'"),
        (
            in_record("update", "q", Array.from_numpy_ndarray(np.ones(14, "i2"))),
            "update q: dtype 'int16', expected int8",
        ),
        (
            in_record("update", "scale", Array.from_numpy_ndarray(np.ones(5, "f4"))),
            "update scale: shape (5,), expected (4,)",
        ),
        (
            in_record("update", "scale", Array.from_numpy_ndarray(-np.ones(4, "f4"))),
            "update q.lora_A: int8 scales must be finite and >= 0",
        ),
        (in_record("update", "q", minus_128_in_lora_b()), "update q.lora_B: int8 value -128"),
        (
            put("update", MetricRecord({"x": 1.0})),
            "update: a MetricRecord, expected an ArrayRecord",
        ),
    ],
)
def test_a_compressed_reply_is_checked_against_the_codecs_layout(change, reason: str) -> None:
    upload = wire.UploadCodec("int8", 0.5, plain_adapter())
    with pytest.raises(WireError) as err:
        wire.decode_reply(int8_reply(change), 0, SHAPES, set(), 0.1, upload)
    assert str(err.value).startswith(reason)
