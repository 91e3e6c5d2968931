"""`fedit simulate-ray`'s own pieces, without Ray: how clients map to the runtime's nodes,
what the Ray backend is asked for, which configs it refuses, and that the rounds stop
waiting once the runtime is gone."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from fedit.config import ConfigError, load_config, rules
from fedit.deploy.simulation_runtime import (
    RayResources,
    RuntimeStoppedError,
    _NodesInOrder,
    _StoppableGrid,
)
from tests.conftest import tiny_run_overrides


class Nodes:
    """The node ids a Grid of the simulation runtime shows (registered so far)."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_node_ids(self) -> list[int]:
        return list(self.ids)


def test_client_k_is_the_kth_smallest_node_once_all_are_registered() -> None:
    grid = Nodes([9_000_000_000_000_000_003, 17, 4_000])
    assert _NodesInOrder(grid, 3)() == {0: 17, 1: 4_000, 2: 9_000_000_000_000_000_003}
    # while the runtime is still registering its nodes, none counts as online: a mapping
    # made from part of them would shift once the rest arrive
    assert _NodesInOrder(Nodes([17, 4_000]), 3)() == {}


def test_a_stopped_runtime_ends_the_wait_for_its_nodes() -> None:
    stopped = threading.Event()
    grid = _StoppableGrid(Nodes([5, 6]), stopped)  # type: ignore[arg-type]
    assert list(grid.get_node_ids()) == [5, 6]
    stopped.set()
    for call in (grid.get_node_ids, lambda: grid.push_messages([]), lambda: grid.pull_messages([])):
        with pytest.raises(RuntimeStoppedError, match="simulation runtime stopped"):
            call()


def test_backend_config_gives_each_worker_its_share() -> None:
    config = RayResources(workers=3, cpus_per_client=2, gpus_per_client=0.5).backend_config()
    assert config["client_resources"] == {"num_cpus": 2, "num_gpus": 0.5}
    init = config["init_args"]
    # the pool holds num_cpus / cpus_per_client actors: exactly `workers`
    assert init["num_cpus"] == 6 and init["include_dashboard"] is False
    assert init["address"] == "local"  # never another process's cluster
    assert "object_store_memory" not in init
    small = RayResources(object_store_mb=100).backend_config()["init_args"]
    assert small["object_store_memory"] == 100 * 1024 * 1024
    assert RayResources(cpus_per_client=0.5).threads == 1
    assert RayResources(cpus_per_client=3).threads == 3


@pytest.mark.parametrize(
    "resources, named",
    [
        (RayResources(workers=0), "--workers"),
        (RayResources(cpus_per_client=0), "--cpus-per-client"),
        (RayResources(gpus_per_client=-1), "--gpus-per-client"),
        (RayResources(object_store_mb=10), "--object-store-mb"),
    ],
)
def test_bad_resources_are_named(resources: RayResources, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        resources.check()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_share_without_a_gpu_is_refused_before_ray_starts() -> None:
    with pytest.raises(ConfigError, match="--gpus-per-client: no GPU"):
        RayResources(gpus_per_client=0.5).check()


@pytest.mark.parametrize(
    "override, named",
    [
        ('federation.mode="local"', "federation.mode"),
        ('federation.mode="centralized"', "federation.mode"),
        ('strategy.lora_aggregation="exact"', "strategy.lora_aggregation"),
    ],
)
def test_configs_the_runtime_cannot_run_are_refused(
    override: str, named: str, tmp_path: Path
) -> None:
    cfg = load_config(None, [*tiny_run_overrides(tmp_path, tmp_path / "run"), override])
    with pytest.raises(ConfigError, match=named):
        rules.check(cfg, "simulate-ray")
