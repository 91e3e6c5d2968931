"""Simulated devices: who is online in a round, how long each client's round takes, and
when the coordinator stops waiting ([system], simulation only).

Client k's device is drawn once per run from the run seed: speed s_k = exp(σ_s·z) and
bandwidth b_k = B·exp(σ_b·z') (z, z' standard normal), or the config's per-client lists;
its availability a_k = 1 − dropout, or listed. In round r client k is online when
u_{r,k} < a_k, u drawn per round from the run seed, so a resumed run sees the same rounds.

A selected client's simulated time is download + training + upload:
    t_k = 8·D / (b_k·10⁶) + K_k · step_seconds / s_k + 8·U_k / (b_k·10⁶)
with D the bytes of the global adapter (float32) and U_k those of its upload (its codec's
payload, fedit.compression.codecs), both at the client's LoRA rank, and K_k the steps its
round takes. With a
``deadline`` T > 0 a client offline or with t_k > T is dropped *without training* (a
straggler contributes nothing; its work would arrive too late), and the round lasts T if
anyone was dropped, else the slowest reply. Without a deadline the coordinator waits for
every online client and learns at once of an offline one (its connection is down), so
the round lasts the slowest reply. Everything here is a function of the config, the seed
and the round, never of the host's clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedit.compression.codecs import state_layout
from fedit.config import RunConfig, clients_per_round
from fedit.fleet.selection import select_clients
from fedit.seeding import Stream, derive_seed

BITS_PER_BYTE = 8
BITS_PER_MEGABIT = 10**6


@dataclass(frozen=True)
class Device:
    speed: float  # relative: a step takes step_seconds / speed
    bandwidth_mbps: float  # each way
    availability: float  # the chance of being online in a round


@dataclass(frozen=True)
class Fate:
    """What the devices make of one selected client's round."""

    seconds: float  # its simulated download + training + upload time
    dropped: str | None  # why it does not train (offline, a straggler), or None


def devices(cfg: RunConfig, num_clients: int) -> list[Device]:
    """Every client's device (the config's lists, else the seeded draw)."""
    system = cfg.system
    rng = np.random.default_rng(derive_seed(cfg.seed, Stream.DEVICES))
    drawn_speed = np.exp(system.speed_spread * rng.standard_normal(num_clients))
    drawn_bandwidth = system.bandwidth_mbps * np.exp(
        system.bandwidth_spread * rng.standard_normal(num_clients)
    )
    speeds = system.speeds or drawn_speed.tolist()
    bandwidths = system.bandwidths_mbps or drawn_bandwidth.tolist()
    availabilities = system.availabilities or [1.0 - system.dropout] * num_clients
    for name, values in (("speeds", speeds), ("bandwidths_mbps", bandwidths)):
        if len(values) != num_clients:
            raise ValueError(f"system.{name}: {len(values)} values for {num_clients} clients")
    if len(availabilities) != num_clients:
        raise ValueError(f"system.availabilities: {len(availabilities)} for {num_clients} clients")
    return [
        Device(float(s), float(b), float(a))
        for s, b, a in zip(speeds, bandwidths, availabilities, strict=True)
    ]


def online_clients(cfg: RunConfig, fleet: Sequence[Device], round_index: int) -> list[int]:
    """The clients online in round `round_index`, sorted."""
    rng = np.random.default_rng(derive_seed(cfg.seed, Stream.DEVICES, round_index))
    draws = rng.random(len(fleet))
    return [k for k, device in enumerate(fleet) if draws[k] < device.availability]


def round_candidates(cfg: RunConfig, num_clients: int, seed: int, round_index: int) -> list[int]:
    """The clients a round draws: m of all N (uniform), or of those online (available; all
    of them when fewer are online than m); for power_of_choice the d candidates it ranks,
    drawn from the online ones when devices are simulated (only those can answer)."""
    fed = cfg.federation
    among = None
    if fed.selection == "available" or (fed.selection == "power_of_choice" and cfg.system.enabled):
        among = online_clients(cfg, devices(cfg, num_clients), round_index)
    count, fraction = fed.clients_per_round, fed.fraction
    if fed.selection == "power_of_choice":
        m = clients_per_round(num_clients, count, fraction)
        count, fraction = fed.candidates or min(2 * m, num_clients), None
    return select_clients(num_clients, count, fraction, seed, round_index, among)


def client_seconds(
    device: Device, steps: int, step_seconds: float, down_bytes: int, up_bytes: int
) -> float:
    """t_k: download, `steps` optimizer steps, upload."""
    link = device.bandwidth_mbps * BITS_PER_MEGABIT
    transfer = BITS_PER_BYTE * (down_bytes + up_bytes) / link
    return transfer + steps * step_seconds / device.speed


def fate(
    cfg: RunConfig, device: Device, online: bool, steps: int, down_bytes: int, up_bytes: int
) -> Fate:
    """Whether a selected client trains this round, and how long it takes."""
    seconds = client_seconds(device, steps, cfg.system.step_seconds, down_bytes, up_bytes)
    deadline = cfg.system.deadline
    if not online:
        return Fate(seconds, "offline (simulated availability)")
    if deadline and seconds > deadline:
        return Fate(seconds, f"straggler: {seconds:.1f} s > system.deadline {deadline:g} s")
    return Fate(seconds, None)


def round_seconds(cfg: RunConfig, fates: Sequence[Fate]) -> float:
    """How long the coordinator waits: the deadline if anyone was dropped under one, else
    the slowest reply (0 for a round with no reply and no deadline)."""
    deadline = cfg.system.deadline
    if deadline and any(f.dropped for f in fates):
        return deadline
    replies = [f.seconds for f in fates if f.dropped is None]
    return max(replies, default=0.0)


def transfer_bytes(cfg: RunConfig, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """(D, U): the raw bytes of the float32 global adapter down and of the client's adapter
    upload (its codec's payload), without framing or the strategy's extra tensors."""
    down = 4 * sum(math.prod(s) for s in shapes.values())
    compression = cfg.compression
    if compression.upload == "none":
        return down, down
    layout = state_layout(compression.upload, shapes, compression.topk_fraction)
    up = sum(math.prod(shape) * dtype.itemsize for dtype, shape in layout.values())
    return down, up
