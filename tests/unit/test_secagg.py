"""Secure aggregation's primitives (fedit.deploy.secagg.crypto), and the behaviour of the Flower
primitives it reuses at the edges the protocol depends on."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest

pytest.importorskip("flwr", reason="secure aggregation reuses flwr's primitives")

from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_utils import (
    pseudo_rand_gen,
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

from fedit.deploy.secagg import crypto
from fedit.deploy.secagg.crypto import RoundParams, SecAggError


def test_flowers_shared_key_takes_no_x25519_keys_so_fedit_agrees_itself() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    with pytest.raises(TypeError):
        generate_shared_key(a, b.public_key())
    pa, pb = crypto.public_bytes(a), crypto.public_bytes(b)
    assert crypto.mask_seed(a, pb) == crypto.mask_seed(b, pa)  # both ends of the pair
    assert crypto.mask_seed(a, pb) != crypto.agree(a, pb, crypto.ENCRYPTION_INFO)
    with pytest.raises(SecAggError, match="32 bytes"):
        crypto.mask_seed(a, pb[:31])
    # a low-order point (all zeros) would give every partner the same zero secret
    with pytest.raises(SecAggError, match="low order"):
        crypto.mask_seed(a, bytes(32))
    assert not crypto.usable_public_key(bytes(32)) and crypto.usable_public_key(pb)


def test_share_encryption_round_trips_for_the_pair_only() -> None:
    a, b, c = (X25519PrivateKey.generate() for _ in range(3))
    key = crypto.encryption_key(a, crypto.public_bytes(b))
    plaintext = share_keys_plaintext_concat(3, 5, b"x" * 52, b"y" * 52)
    token = encrypt(key, plaintext)
    assert decrypt(crypto.encryption_key(b, crypto.public_bytes(a)), token) == plaintext
    assert share_keys_plaintext_separate(plaintext) == (3, 5, b"x" * 52, b"y" * 52)
    with pytest.raises(InvalidToken):
        decrypt(crypto.encryption_key(c, crypto.public_bytes(a)), token)


def test_any_threshold_of_the_shares_rebuild_the_secret() -> None:
    secret = os.urandom(32)
    shares = crypto.share_secrets(secret, holders=5, threshold=3)
    assert {len(s) for s in shares} == {crypto.SHARE_BYTES}
    for chosen in (shares[:3], shares[2:], [shares[0], shares[2], shares[4]], shares):
        assert crypto.rebuild(chosen, 3, lambda s: s == secret) == secret


def test_fewer_shares_than_the_threshold_never_pass_for_the_secret() -> None:
    """flwr's combine_shares with t − 1 shares raises or returns some other secret (it
    returned one in ~1% of tries here, unpadding by chance); rebuild refuses both."""
    for _ in range(200):
        secret = os.urandom(32)
        shares = create_shares(secret, 3, 5)
        with contextlib.suppress(ValueError):
            assert combine_shares(shares[:2]) != secret
        with pytest.raises(SecAggError, match="2 share"):
            crypto.rebuild(shares[:2], 3, lambda s: True)
        with pytest.raises(SecAggError, match="do not rebuild"):
            crypto.rebuild(shares[:3], 3, lambda s: False)  # a share was altered, say


def test_thresholds_below_two_or_above_the_holders_are_refused() -> None:
    secret = os.urandom(32)
    # flwr shares a secret with threshold 1 as itself: every share holds it in the clear
    (alone,) = create_shares(secret, 1, 1)
    assert alone[4:36] == secret
    # and a threshold above the holders makes shares nobody can ever combine
    assert len(create_shares(secret, 6, 5)) == 5
    for threshold in (1, 6):
        with pytest.raises(SecAggError, match="threshold"):
            crypto.share_secrets(secret, 5, threshold)


def test_flowers_prg_folds_its_seed_to_32_bits_fedits_does_not() -> None:
    one = (1).to_bytes(4, "little")
    folded_alike = [one + one + bytes(24), bytes(32)]  # 1 XOR 1 == 0 XOR 0
    a, b = (pseudo_rand_gen(s, 2**32, [(64,)])[0] for s in folded_alike)
    assert np.array_equal(a, b)
    x, y = (crypto.prg(s, 64, 32) for s in folded_alike)
    assert not np.array_equal(x, y)
    # flwr never draws the top value of its range; fedit's masks cover all of Z_{2^bits}
    assert pseudo_rand_gen(os.urandom(32), 4, [(4000,)])[0].max() == 2
    assert set(crypto.prg(os.urandom(32), 4000, 2).tolist()) == {0, 1, 2, 3}
    seed = os.urandom(32)
    assert np.array_equal(crypto.prg(seed, 10, 40), crypto.prg(seed, 10, 40))
    assert int(crypto.prg(seed, 1000, 40).max()) < 2**40


def test_pairwise_masks_cancel_in_the_sum() -> None:
    bits, keys = 20, [X25519PrivateKey.generate() for _ in range(4)]
    publics = [crypto.public_bytes(k) for k in keys]
    total = np.zeros(50, dtype=np.uint64)
    for u in range(4):
        for v in range(4):
            if u != v:
                seed = crypto.mask_seed(keys[u], publics[v])
                total = crypto.add(total, crypto.pair_mask(seed, u, v, 50, bits), bits)
    assert not total.any()


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")
def test_flowers_quantiser_wraps_at_the_clip_range_so_fedit_quantises_itself() -> None:
    # (c + c)·R/(2c) rounds above R = 2**31 − 1 for c = 0.003, its ceiling 2**31 wraps
    assert int(quantize([np.array([0.003])], 0.003, crypto.MAX_LEVELS)[0][0]) == -(2**31)
    params = RoundParams(bits=32, clip_range=0.003, sampled=2)
    assert int(crypto.quantise(np.array([0.003]), params, seed=0)[0]) == params.levels
    assert RoundParams(bits=32, clip_range=1.0, sampled=1).levels == crypto.MAX_LEVELS
    assert RoundParams(bits=32, clip_range=1.0, sampled=3).levels == (2**32 - 1) // 3


def test_quantise_clips_rounds_within_one_level_and_is_seeded() -> None:
    params = RoundParams(bits=16, clip_range=2.0, sampled=4)
    vector = np.linspace(-3.0, 3.0, 1001)
    before = np.random.get_state()[1].copy()
    q = crypto.quantise(vector, params, seed=7)
    assert np.array_equal(np.random.get_state()[1], before)  # the global draw untouched
    assert np.array_equal(q, crypto.quantise(vector, params, seed=7))
    assert q.dtype == np.uint64 and int(q.max()) == params.levels and int(q.min()) == 0
    step = 2 * params.clip_range / params.levels
    back = crypto.dequantise_sum(q, params, 1)
    inside = np.abs(vector) <= params.clip_range
    assert np.all(np.abs(back[inside] - vector[inside]) < step)
    assert np.all(np.abs(back[~inside]) == pytest.approx(params.clip_range))


def test_a_sum_is_dequantised_with_every_clients_offset() -> None:
    params = RoundParams(bits=20, clip_range=1.0, sampled=3)
    rows = [np.array([0.5, -0.25, 0.0]), np.array([0.25, 0.25, -1.0]), np.array([1, 0, 0.5])]
    total = sum(crypto.quantise(r, params, seed=k) for k, r in enumerate(rows))
    # flwr's dequantize takes one client's offset c away, not three
    flower = dequantize([total.astype(np.int64)], 1.0, params.levels)[0]
    assert flower == pytest.approx(sum(rows) + 2.0, abs=1e-4)
    exact = crypto.dequantise_sum(total, params, 3)
    assert np.all(np.abs(exact - sum(rows)) < params.error_bound(3, 1.0))


def test_the_masking_graph_is_k_regular_symmetric_and_seeded() -> None:
    clients = [0, 2, 3, 5, 8, 9, 11]
    graph = crypto.neighbours(clients, 4, seed=1)
    assert graph == crypto.neighbours(clients, 4, seed=1)
    for u, near in graph.items():
        assert len(near) == 4 and u not in near
        assert all(u in graph[v] for v in near)
    complete = crypto.neighbours(clients, 6, seed=1)
    assert all(len(near) == 6 for near in complete.values())
    assert crypto.round_degree(0, 5) == 4 and crypto.round_degree(2, 5) == 2
    assert crypto.round_degree(6, 3) == 2
    assert crypto.round_threshold(0, 2) == 2 and crypto.round_threshold(0, 4) == 3
    assert crypto.round_threshold(4, 6) == 4
    assert crypto.round_threshold(0, 0) == 2  # one client alone: never its own sum


def test_a_rebuilt_mask_key_is_checked_against_the_advertised_one() -> None:
    key, other = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    secret = crypto.private_bytes(key)
    assert crypto.mask_key_matches(secret, crypto.public_bytes(key))
    assert not crypto.mask_key_matches(secret, crypto.public_bytes(other))


CLIP_SWEEP = sorted({*np.geomspace(1e-4, 1e3, 150).tolist(), 0.003, 0.03, 0.06, 1.0})


@pytest.mark.parametrize(
    "bits, sampled",
    [(16, 3), (20, 2), (31, 1), (32, 1), (32, 2), (32, 3), (33, 4), (34, 5), (40, 7), (62, 16)],
)
def test_entries_at_the_clip_range_never_wrap_in_the_sum(bits: int, sampled: int) -> None:
    """Every client at ±c (or beyond, clipped) for every clip range of the sweep: each
    quantised entry stays in [0, R] and their sum below 2**bits, so the dequantised mean is
    ±c within one level (flwr's quantize gives 0.003 at R = 2**31 − 1 the level 2**31,
    which wraps to −2**31: two clients at +0.003 averaged to −0.003)."""
    for clip in CLIP_SWEEP:
        params = RoundParams(bits=bits, clip_range=clip, sampled=sampled)
        vector = np.array([clip, -clip, 3 * clip, -3 * clip])
        total = np.zeros(4, dtype=np.uint64)
        for k in range(sampled):
            q = crypto.quantise(vector, params, seed=k)
            assert int(q.max()) <= params.levels, (clip, q)
            total = crypto.add(total, q, bits)
        assert int(total.max()) <= params.modulus - 1
        mean = crypto.dequantise_sum(total, params, sampled) / sampled
        step = 2 * clip / params.levels
        expected = np.array([clip, -clip, clip, -clip])
        assert np.all(np.abs(mean - expected) <= step), (clip, mean)
