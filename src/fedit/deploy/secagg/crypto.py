"""Secure aggregation's arithmetic and cryptography (SecAgg+: Bell, Bonawitz, Gascón,
Lepoint, Raykova, CCS 2020; SecAgg: Bonawitz et al., CCS 2017), without any transport.

Both ends of a secure round (fedit.deploy.secagg.coordinator, fedit.deploy.secagg.owner) use
these functions only, so what a client masks is exactly what the coordinator unmasks.
Flower's maintained primitives are reused where they fit
(``flwr.common.secure_aggregation``: Shamir shares, Fernet encryption, the share plaintext
layout); tests/unit/test_secagg.py pins their edge cases, which are this protocol's:

- ``generate_shared_key`` takes EC keys only (it calls ``exchange(ECDH(), ...)``), so the
  X25519 agreement and its HKDF are done here with ``cryptography``.
- ``pseudo_rand_gen`` folds its seed to 32 bits (a coordinator could try every seed) and
  never draws the top value of its range, so the masks come from ChaCha20 here (``prg``).
- ``quantize`` is not used: it takes the ceiling in int32 before any caller could clamp,
  and (c + c)·R/(2c) rounds above R for ~14% of clip ranges c, so at R = 2**31 − 1 an
  entry at +c becomes 2**31 and wraps to −2**31 (and below that cap, R + 1 from every
  client wraps the sum mod 2**bits); it also draws from numpy's global, unseeded generator.
  ``quantise`` clamps every level into [0, R] and seeds its own draw.
- ``combine_shares`` with fewer shares than the threshold returns a wrong secret now and
  then instead of failing, and ``create_shares`` with threshold 1 hands out the secret
  itself: every rebuilt secret is checked here (``rebuild``), and thresholds start at 2.
- ``dequantize`` removes one client's offset: a sum of m inputs needs m, so
  ``dequantise_sum`` does the one line itself, the inverse of ``quantise``.
"""

from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

from fedit.types import AdapterState

KEY_BYTES = 32  # X25519 keys, the self-mask seed b, pairwise seeds
# The most levels R a round uses: a step of 2c/2**31 is far below float32's precision
# (the aggregate is float32), and R < 2**53 keeps every level exact in float64, which
# quantise's clamp to R relies on.
MAX_LEVELS = 2**31 - 1
# The fewest levels R a round may use: 8-bit quantisation, the coarsest in use; below it
# (too many clients for secagg.bits) the step 2c/R drowns the update.
MIN_LEVELS = 255
SHARE_BYTES = 4 + 48  # create_shares of a 32-byte secret: index + 3 padded 16-byte chunks
MASK_INFO = b"fedit secagg pairwise mask"
ENCRYPTION_INFO = b"fedit secagg share encryption"
SELF_MASK_NONCE = b"\0" * 16  # b and every pairwise seed are fresh each round
PAIR_MASK_NONCE = b"\1" + b"\0" * 15


class SecAggError(ValueError):
    """A secure round's input cannot be used (a wrong key, share or ciphertext)."""


@dataclass(frozen=True)
class RoundParams:
    """One round's public parameters: the modulus 2**bits, the clip range c, and the
    number of sampled clients m, which bounds the sum and so sets the quantiser's levels R
    (m inputs of at most R each never wrap mod 2**bits)."""

    bits: int
    clip_range: float
    sampled: int

    def __post_init__(self) -> None:
        if self.levels < MIN_LEVELS:
            raise ValueError(
                f"secagg.bits = {self.bits} leaves {self.sampled} clients of a round "
                f"{self.levels} quantisation levels each (at least {MIN_LEVELS}): raise secagg.bits"
            )

    @property
    def modulus(self) -> int:
        return 2**self.bits

    @property
    def levels(self) -> int:
        """R: a clipped entry x in [-c, c] is quantised into [0, R], so a sum of at most m
        entries is at most m·R = m·⌊(2**bits − 1)/m⌋ ≤ 2**bits − 1: it never wraps."""
        return min((self.modulus - 1) // self.sampled, MAX_LEVELS)

    def error_bound(self, survivors: int, total_weight: float) -> float:
        """The most one entry of the weighted mean can differ from the exact one (no entry
        clipped): stochastic rounding moves each client's entry by less than one level of
        2c/R, so the sum of `survivors` entries by less than survivors · 2c/R, then divided
        by Σ w_k."""
        return survivors * 2 * self.clip_range / self.levels / total_weight


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def mask_key_matches(secret: bytes, public: bytes) -> bool:
    """Whether a rebuilt mask secret key is the one whose public key the client advertised."""
    return public_bytes(X25519PrivateKey.from_private_bytes(secret)) == public


def agree(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte secret both ends of a pair derive: HKDF-SHA256 over X25519(sk_u, pk_v),
    separated by `info` (the share key and the mask seed never coincide)."""
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public)
    except ValueError:
        raise SecAggError("a public key is not 32 bytes of X25519") from None
    try:
        shared = private.exchange(peer)
    except ValueError:  # a low-order point: the shared secret would be all zeros
        raise SecAggError("a public key of low order (no shared secret)") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def usable_public_key(public: bytes) -> bool:
    """Whether `public` agrees with some key: X25519 refuses low-order points, whose shared
    secret is zero whatever the other key (a client advertising one is refused at (a))."""
    try:
        agree(X25519PrivateKey.generate(), public, MASK_INFO)
    except SecAggError:
        return False
    return True


def encryption_key(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The Fernet key (urlsafe base64, as flwr's encrypt/decrypt take it) of a pair."""
    return base64.urlsafe_b64encode(agree(private, peer_public, ENCRYPTION_INFO))


def mask_seed(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    return agree(private, peer_public, MASK_INFO)


def prg(seed: bytes, length: int, bits: int, nonce: bytes = SELF_MASK_NONCE) -> np.ndarray:
    """`length` uniform values in Z_{2^bits} (uint64) from a 32-byte seed: the ChaCha20
    keystream read as little-endian uint64 and cut to `bits` bits."""
    if len(seed) != KEY_BYTES:
        raise SecAggError(f"a mask seed must be {KEY_BYTES} bytes, got {len(seed)}")
    stream = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    values = np.frombuffer(stream.update(bytes(8 * length)), dtype="<u8").astype(np.uint64)
    return values & np.uint64(2**bits - 1)


def pair_mask(seed: bytes, own: int, peer: int, length: int, bits: int) -> np.ndarray:
    """The pairwise mask client `own` adds for `peer`: +PRG(s) for the smaller id, −PRG(s)
    for the larger, so the two cancel in the sum (mod 2^bits)."""
    values = prg(seed, length, bits, PAIR_MASK_NONCE)
    return values if own < peer else negate(values, bits)


def negate(values: np.ndarray, bits: int) -> np.ndarray:
    return (np.uint64(0) - values) & np.uint64(2**bits - 1)


def add(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """(a + b) mod 2^bits for bits ≤ 62 (uint64 never overflows below 2^63 + 2^63)."""
    return (a + b) & np.uint64(2**bits - 1)


def share_secrets(secret: bytes, holders: int, threshold: int) -> list[bytes]:
    """Shamir shares of `secret`, any `threshold` of the `holders` rebuild it."""
    if not 2 <= threshold <= holders:
        raise SecAggError(f"threshold {threshold} must be in [2, {holders}] for {holders} holders")
    return create_shares(secret, threshold, holders)


def rebuild(shares: list[bytes], threshold: int, check) -> bytes:
    """The secret from at least `threshold` consistent shares; `check(secret)` must hold
    (combine_shares alone may return a wrong secret instead of failing)."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} share(s), {threshold} needed")
    try:
        secret = combine_shares(shares)
    except ValueError:
        secret = b""
    if len(secret) != KEY_BYTES or not check(secret):
        raise SecAggError("the shares do not rebuild the committed secret")
    return secret


def digest(secret: bytes) -> bytes:
    """A client's commitment to its self-mask seed b (sent before any share is used)."""
    return hashlib.sha256(secret).digest()


def quantise(vector: np.ndarray, params: RoundParams, seed: int) -> np.ndarray:
    """float64 entries → [0, R] (uint64): clipped to [-c, c], shifted and scaled into
    [0, R], rounded stochastically (up with the probability of the fraction: unbiased) by
    a draw seeded with `seed`."""
    clip, levels = params.clip_range, params.levels
    scaled = (np.clip(vector, -clip, clip) + clip) * (levels / (2 * clip))
    # 2c·R/(2c) may come out a rounding error above R: without the clamp an entry at +c
    # could round up to R + 1, and m such entries exceed 2**bits − 1 (RoundParams.levels)
    scaled = np.clip(scaled, 0.0, float(levels))
    floor = np.floor(scaled)
    up = np.random.default_rng(seed).random(scaled.shape) < scaled - floor
    return (floor + up).astype(np.uint64)


def dequantise_sum(total: np.ndarray, params: RoundParams, count: int) -> np.ndarray:
    """Σ x_k (float64) from Σ q_k of `count` clients: each q_k = (x_k + c)·R/(2c), so
    Σ x_k = Σ q_k·2c/R − count·c."""
    clip = params.clip_range
    return total.astype(np.float64) * (2 * clip / params.levels) - count * clip


def flatten(state: AdapterState, shapes: dict[str, tuple[int, ...]]) -> np.ndarray:
    """The tensors in sorted-name order as one float64 vector (both ends use `shapes`)."""
    return np.concatenate([state[name].double().reshape(-1).numpy() for name in sorted(shapes)])


def unflatten(vector: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> AdapterState:
    """float32 tensors of `shapes` from flatten's layout."""
    state, at = {}, 0
    for name in sorted(shapes):
        size = math.prod(shapes[name])
        piece = vector[at : at + size].reshape(shapes[name])
        state[name] = torch.from_numpy(np.ascontiguousarray(piece, dtype=np.float32))
        at += size
    return state


def vector_length(shapes: dict[str, tuple[int, ...]], weighted: bool) -> int:
    """Entries of the masked vector: the adapter's, plus the record count n_k when the
    mean is weighted by it (weighting = "examples")."""
    return sum(math.prod(s) for s in shapes.values()) + int(weighted)


def neighbours(clients: list[int], degree: int, seed: int) -> dict[int, list[int]]:
    """SecAgg+'s masking graph over `clients`: with `degree` k (even) below n − 1, a
    Harary graph (the clients on a ring in a seeded random order, each joined to the k/2
    on either side); otherwise every pair (SecAgg's complete graph)."""
    n = len(clients)
    if degree >= n - 1:
        return {u: [v for v in clients if v != u] for u in clients}
    order = [clients[i] for i in np.random.RandomState(seed % 2**32).permutation(n)]
    where = {u: i for i, u in enumerate(order)}
    offsets = [j for d in range(1, degree // 2 + 1) for j in (d, -d)]
    return {u: sorted(order[(where[u] + j) % n] for j in offsets) for u in clients}


def round_degree(configured: int, alive: int) -> int:
    """k for a round with `alive` clients: the configured k, at most alive − 1 (0: all)."""
    return alive - 1 if configured == 0 else min(configured, alive - 1)


def round_threshold(configured: int, degree: int) -> int:
    """t: the configured one, or a strict majority of a client's k + 1 shareholders (its
    neighbours and itself), SecAgg+'s guidance against a coordinator with a minority; never
    below 2, so that a round also needs two clients (the sum of one is its update)."""
    return max(2, configured or (degree + 1) // 2 + 1)
