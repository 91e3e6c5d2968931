"""Upload codecs: each round trip within its stated error, bytes counted exactly, error
feedback that carries what top-k dropped, peers' malformed parts refused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedit.client.feedback import UploadCompressor, compress
from fedit.client.store import RoundStore
from fedit.compression import codecs
from fedit.compression.codecs import CodecError, decode_tensor, encode_tensor, payload_bytes
from fedit.config import CompressionConfig
from fedit.types import ClientTask, ClientUpdate

SHAPES = {"a": (8, 64), "b": (64, 8), "bias": (5,), "square": (6, 6)}


def random_delta(seed: int = 0, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=gen) for k, s in SHAPES.items()}


def round_trip(codec: str, tensor: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    return decode_tensor(codec, encode_tensor(codec, tensor, fraction), tuple(tensor.shape), "t")


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_none_is_exact_and_bf16_is_within_half_an_ulp(name: str) -> None:
    value = random_delta()[name]
    assert torch.equal(round_trip("none", value), value)
    error = (round_trip("bf16", value) - value).abs()
    assert bool((error <= value.abs() * 2.0**-8).all())
    assert error.max() > 0  # it is lossy: the bound is not vacuous


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_int8_error_is_at_most_half_a_step_of_its_slice(name: str) -> None:
    value = random_delta(1)[name]
    parts = encode_tensor("int8", value, 0.1)
    scale = parts["scale"]
    step = codecs._broadcast(scale, value.shape)
    error = (round_trip("int8", value) - value).abs()
    assert bool((error <= step / 2 + 1e-12).all())
    # every slice's largest entry is exact: it is ±127 steps
    assert int(parts["q"].abs().max()) == codecs.INT8_LEVELS


def test_int8_slices_a_lora_factor_by_rank_component() -> None:
    a = torch.zeros(8, 64)
    a[3, 10] = 2.0  # one rank component with a large entry: only its scale is large
    a[5, :] = 0.001
    parts = encode_tensor("int8", a, 0.1)
    assert parts["scale"].shape == (8,)  # one per row of A (r × in)
    assert parts["scale"][3] == pytest.approx(2.0 / 127)
    assert torch.allclose(round_trip("int8", a)[5], a[5], atol=1e-9)
    assert encode_tensor("int8", a.T.contiguous(), 0.1)["scale"].shape == (8,)  # B: columns
    assert encode_tensor("int8", torch.zeros(4, 4), 0.1)["scale"].tolist() == [0.0] * 4


def test_topk_keeps_the_largest_entries_exactly_and_zeroes_the_rest() -> None:
    value = torch.tensor([[0.5, -3.0, 0.1, 2.0], [0.0, -0.2, 1.0, 0.3]])
    parts = encode_tensor("topk", value, 0.25)  # ⌈0.25 · 8⌉ = 2 kept
    assert parts["indices"].tolist() == [1, 3]  # ascending flat indices of -3.0 and 2.0
    assert parts["values"].tolist() == [-3.0, 2.0]
    expected = torch.zeros_like(value)
    expected[0, 1], expected[0, 3] = -3.0, 2.0
    assert torch.equal(round_trip("topk", value, 0.25), expected)
    assert codecs.kept_entries(8, 1e-9) == 1 and codecs.kept_entries(8, 1.0) == 8


@pytest.mark.parametrize("codec", ["none", "bf16", "int8", "topk"])
def test_payload_bytes_are_exact_and_match_the_layout(codec: str) -> None:
    delta = random_delta()
    encoded = codecs.encode_state(codec, delta, 0.1)
    n = sum(math.prod(s) for s in SHAPES.values())
    kept = sum(codecs.kept_entries(math.prod(s), 0.1) for s in SHAPES.values())
    expected = {
        "none": 4 * n,
        "bf16": 2 * n,
        "int8": n + 4 * (8 + 8 + 1 + 6),  # one float32 scale per slice
        "topk": 8 * kept,
    }[codec]
    assert payload_bytes(encoded) == expected
    layout = codecs.state_layout(codec, SHAPES, 0.1)
    assert {p: (t.dtype, tuple(t.shape)) for p, t in encoded.items()} == layout
    decoded = codecs.decode_state(codec, encoded, SHAPES, 0.1)
    assert list(decoded) == list(SHAPES)
    for name, tensor in decoded.items():  # the concatenation splits back per tensor
        assert torch.equal(tensor, round_trip(codec, delta[name]))


def test_error_feedback_sends_everything_top_k_dropped_in_later_rounds() -> None:
    # magnitudes within a factor 2 of each other: each entry's memory outgrows the sent
    # ones' within a few rounds
    delta = {k: v.sign() * (1 + v.abs() / v.abs().max()) for k, v in random_delta(2).items()}
    memory = {k: torch.zeros_like(v) for k, v in delta.items()}
    sent_total = {k: torch.zeros_like(v) for k, v in delta.items()}
    rounds = 8
    for _ in range(rounds):  # the same Δ each round, a quarter of each tensor sent
        packed = compress(delta, "topk", 0.25, memory)
        assert packed.memory is not None
        for k in delta:  # nothing is lost: sent + kept = Δ + e
            assert torch.allclose(packed.sent[k] + packed.memory[k], delta[k] + memory[k])
            sent_total[k] += packed.sent[k]
        memory = packed.memory
    for k in delta:  # Σ sent = TΔ − e, and every entry has been sent at least once
        assert torch.allclose(sent_total[k], rounds * delta[k] - memory[k], atol=1e-5)
        assert bool((sent_total[k] != 0).all())
    without = compress(delta, "topk", 0.25, None)
    assert without.memory is None


def test_the_memory_store_keeps_the_named_round_and_the_new_one(tmp_path: Path) -> None:
    store = RoundStore(tmp_path / "client_0", "memory")
    like = random_delta()
    assert all(bool((t == 0).all()) for t in store.load(0, like).values())
    for n in (1, 2, 3):
        store.save(n, random_delta(n), named=1)
    assert sorted(p.name for p in store.directory.iterdir()) == [
        "round_0001.safetensors",
        "round_0003.safetensors",
    ]
    assert torch.equal(store.load(3, like)["a"], random_delta(3)["a"])
    assert all(bool((t == 0).all()) for t in store.load(2, like).values())  # lost: zeros
    with pytest.raises(ValueError, match="not this adapter's"):
        store.load(3, {"a": torch.zeros(2, 2)})


def test_a_client_compressor_continues_from_the_named_memory(tmp_path: Path) -> None:
    config = CompressionConfig(upload="topk", topk_fraction=0.25)
    compressor = UploadCompressor(config, RoundStore(tmp_path, "memory"))
    x = random_delta(5, scale=1.0)
    y = {k: v + d for (k, v), d in zip(x.items(), random_delta(6).values(), strict=True)}
    update = ClientUpdate(client_id=0, state=y, num_examples=3, num_steps=1, learning_rate=0.1)

    def task(n: int, named: int) -> ClientTask:
        return ClientTask(n, 0, "sft", 0.1, 0, feedback_round=named)

    first = compressor.apply(update, x, task(1, 0))
    assert first.encoded is not None
    again = compressor.apply(update, x, task(1, 0))  # round 1 trained again: same upload
    assert all(torch.equal(first.state[k], again.state[k]) for k in x)
    second = compressor.apply(update, x, task(2, 1))  # from round 1's memory: other entries
    assert not all(torch.equal(first.state[k], second.state[k]) for k in x)
    with pytest.raises(ValueError, match="exactly when"):
        UploadCompressor(config, None)


@pytest.mark.parametrize(
    ("codec", "parts", "message"),
    [
        ("int8", {"q": torch.full((2, 3), -128, dtype=torch.int8), "scale": torch.ones(2)}, "-128"),
        ("int8", {"q": torch.ones(2, 3, dtype=torch.int8), "scale": -torch.ones(2)}, ">= 0"),
        (
            "int8",
            {"q": torch.ones(2, 3, dtype=torch.int8), "scale": torch.tensor([1.0, math.inf])},
            "finite",
        ),
        (
            "int8",
            {"q": torch.full((2, 3), 127, dtype=torch.int8), "scale": torch.full((2,), 3e38)},
            "non-finite",
        ),
        (
            "topk",
            {"indices": torch.tensor([2, 1], dtype=torch.int32), "values": torch.ones(2)},
            "ascending",
        ),
        (
            "topk",
            {"indices": torch.tensor([1, 1], dtype=torch.int32), "values": torch.ones(2)},
            "ascending",
        ),
        (
            "topk",
            {"indices": torch.tensor([0, 6], dtype=torch.int32), "values": torch.ones(2)},
            "range",
        ),
        (
            "topk",
            {"indices": torch.tensor([-1, 2], dtype=torch.int32), "values": torch.ones(2)},
            "range",
        ),
        ("bf16", {"bits": torch.full((2, 3), 0x7FC0, dtype=torch.int16)}, "non-finite"),
    ],
)
def test_parts_no_encoder_writes_are_refused(codec: str, parts: dict, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode_tensor(codec, parts, (2, 3), "layer.lora_A")
