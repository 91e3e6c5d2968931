"""Simulated devices: seeded profiles and availability, times computed by hand, the
deadline's drops, and selection among the online clients."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fedit.config import ConfigError, DataConfig, PartitionConfig, RunConfig, SystemConfig
from fedit.fleet import devices
from fedit.fleet.devices import Device, Fate
from fedit.fleet.selection import highest_losses, select_clients
from fedit.ops.ranks import rank_shapes
from fedit.seeding import Stream, derive_seed


def base(num_clients: int = 10) -> RunConfig:
    return RunConfig(
        data=DataConfig(path="synthetic"), partition=PartitionConfig(num_clients=num_clients)
    )


def config(num_clients: int = 10, **system: object) -> RunConfig:
    on = SystemConfig(enabled=True, **system)  # type: ignore[arg-type]
    return replace(base(num_clients), system=on).validate()


def test_devices_are_drawn_once_from_the_seed_or_listed() -> None:
    cfg = config(speed_spread=0.5, bandwidth_spread=1.0, dropout=0.2)
    fleet = devices.devices(cfg, 10)
    assert fleet == devices.devices(cfg, 10)  # the same run seed: the same devices
    assert len({d.speed for d in fleet}) == 10 and all(d.availability == 0.8 for d in fleet)
    other = devices.devices(replace(cfg, seed=cfg.seed + 1), 10)
    assert [d.speed for d in other] != [d.speed for d in fleet]
    alike = devices.devices(config(), 3)
    assert alike == [Device(1.0, 20.0, 1.0)] * 3  # no spread: the medians
    listed = config(2, speeds=[1.0, 0.5], bandwidths_mbps=[10.0, 1.0], availabilities=[1.0, 0.5])
    assert devices.devices(listed, 2)[1] == Device(0.5, 1.0, 0.5)


def test_availability_is_a_seeded_draw_per_round_at_the_configured_rate() -> None:
    cfg = config(dropout=0.3)
    fleet = devices.devices(cfg, 20)
    rounds = [devices.online_clients(cfg, fleet, r) for r in range(200)]
    assert rounds == [devices.online_clients(cfg, fleet, r) for r in range(200)]
    online_share = sum(map(len, rounds)) / (200 * 20)
    assert 0.66 < online_share < 0.74
    assert devices.online_clients(config(), devices.devices(config(), 5), 3) == list(range(5))


def test_selection_among_candidates_keeps_the_uniform_draw_and_takes_a_short_pool() -> None:
    seed, r = 7, 4
    rng = np.random.default_rng(derive_seed(seed, Stream.SELECTION, r))
    before = sorted(int(i) for i in rng.choice(10, size=3, replace=False))
    assert select_clients(10, 3, None, seed, r) == before  # unchanged for existing runs
    picked = select_clients(10, 3, None, seed, r, among=[1, 4, 5, 8, 9])
    assert len(picked) == 3 and set(picked) <= {1, 4, 5, 8, 9}
    assert select_clients(10, 3, None, seed, r, among=[6, 2]) == [2, 6]
    assert select_clients(10, 3, None, seed, r, among=[]) == []


def test_available_selection_picks_only_online_clients() -> None:
    cfg = config(dropout=0.5)
    cfg = replace(
        cfg, federation=replace(cfg.federation, selection="available", clients_per_round=3)
    )
    fleet = devices.devices(cfg, 10)
    for r in range(20):
        online = devices.online_clients(cfg, fleet, r)
        chosen = devices.round_candidates(cfg, 10, cfg.seed, r)
        assert set(chosen) <= set(online) and len(chosen) == min(3, len(online))


def test_a_clients_time_and_the_deadline_by_hand() -> None:
    device = Device(speed=0.5, bandwidth_mbps=8.0, availability=1.0)
    # 2 MB down + 1 MB up at 8 Mbit/s = 3 s; 4 steps of 1.5 s at half speed = 12 s
    assert devices.client_seconds(device, 4, 1.5, 2_000_000, 1_000_000) == pytest.approx(15.0)
    cfg = config(step_seconds=1.5, deadline=10.0)
    late = devices.fate(cfg, device, True, 4, 2_000_000, 1_000_000)
    assert late.dropped == "straggler: 15.0 s > system.deadline 10 s"
    assert devices.fate(cfg, device, False, 1, 0, 0).dropped.startswith("offline")
    on_time = devices.fate(cfg, device, True, 1, 0, 0)
    assert on_time == Fate(3.0, None)
    assert devices.round_seconds(cfg, [on_time, late]) == 10.0  # it waited for the straggler
    assert devices.round_seconds(cfg, [on_time]) == 3.0
    no_deadline = config(step_seconds=1.5)
    assert devices.round_seconds(no_deadline, [on_time, Fate(9.0, "offline")]) == 3.0
    assert devices.round_seconds(no_deadline, []) == 0.0


def test_upload_bytes_follow_the_codec() -> None:
    shapes = {"a": (8, 64), "b": (64, 8)}
    assert devices.transfer_bytes(config(), shapes) == (4096, 4096)
    cfg = config()
    int8 = replace(cfg, compression=replace(cfg.compression, upload="int8"))
    assert devices.transfer_bytes(int8, shapes) == (4096, 1024 + 4 * 16)
    # a rank-2 client of a rank-8 adapter moves a quarter of its tensors
    lora = {"m.lora_A.default.weight": (8, 64), "m.lora_B.default.weight": (64, 8)}
    assert devices.transfer_bytes(config(), rank_shapes(lora, 2)) == (1024, 1024)


def test_the_config_refuses_what_the_device_model_cannot_mean() -> None:
    with pytest.raises(ConfigError, match="system.speeds: lists 2 clients"):
        config(speeds=[1.0, 2.0])
    with pytest.raises(ConfigError, match="system.dropout: must be in"):
        config(dropout=1.0)
    with pytest.raises(ConfigError, match="set availabilities or dropout"):
        config(availabilities=[0.5] * 10, dropout=0.1)
    cfg = base()
    with pytest.raises(ConfigError, match="federation.selection: 'available' selects"):
        replace(cfg, federation=replace(cfg.federation, selection="available")).validate()
    with pytest.raises(ConfigError, match="system.enabled: simulates a federation's"):
        on = config()
        replace(on, federation=replace(on.federation, mode="centralized")).validate()


def test_power_of_choice_takes_the_highest_losses_of_its_candidates() -> None:
    losses = {3: 0.5, 1: 2.0, 7: 1.0, 4: 2.0}
    assert highest_losses(losses, 2) == [1, 4]  # a tie, both in
    assert highest_losses(losses, 3) == [1, 4, 7]
    assert highest_losses({2: 1.0, 5: 1.0}, 1) == [2]  # ties go to the lower id
    cfg = base()
    poc = replace(cfg, federation=replace(cfg.federation, selection="power_of_choice"))
    poc = replace(poc, federation=replace(poc.federation, clients_per_round=3)).validate()
    candidates = devices.round_candidates(poc, 10, poc.seed, 0)
    assert len(candidates) == 6  # d = 2m by default
    uniform = replace(poc, federation=replace(poc.federation, selection="uniform"))
    assert len(devices.round_candidates(uniform, 10, poc.seed, 0)) == 3
    with pytest.raises(ConfigError, match="federation.candidates: must be >= the 3 clients"):
        replace(poc, federation=replace(poc.federation, candidates=2)).validate()
    with pytest.raises(ConfigError, match="outside the DP analysis"):
        private = replace(poc, privacy=replace(poc.privacy, mode="local", noise_multiplier=1.0))
        replace(private, strategy=replace(private.strategy, weighting="uniform")).validate()
