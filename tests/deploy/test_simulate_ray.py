"""`fedit simulate-ray`: fedit's rounds under Flower's simulation runtime (Ray backend).

The loopback tests run both sides of fedit.deploy.simulation_runtime in this process (the
ServerApp's rounds, two workers' RuntimeOwners answering each round's messages in turn, so
a worker trains a different client every round) and compare every round's adapter with the
in-process simulation's, bit for bit, for the paths that differ from an owner's: SCAFFOLD's
c_k and the DPO references, kept on a disk the workers share. The last test runs the
command itself: Ray, two workers of one CPU, a 2-round 3-client FedAvg on the tiny model.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from fedit.config import RunConfig, load_config
from fedit.deploy import coordinator, simulation_runtime
from fedit.deploy.flower.flower_io import reply_for
from fedit.deploy.simulation_runtime import RuntimeOwners
from fedit.engine.simulation import Simulation
from tests.conftest import tiny_run_overrides
from tests.deploy.conftest import FEDIT_SRC
from tests.integration.test_dpo_engine import dpo_config


class LoopbackRuntime:
    """The runtime's Grid and its workers in this process (stands in for the Grid's node
    list and flower_io.exchange): message i of the n-th exchange goes to worker
    (n + i) % len(workers)."""

    def __init__(self, workers: list[RuntimeOwners], num_clients: int) -> None:
        self.workers = workers
        self.node_ids = [1_000_003 * (num_clients - k) for k in range(num_clients)]  # unsorted
        self.exchanges = 0
        self.outcomes: list[str] = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def exchange(self, _grid: object, messages: list[Message], _deadline: float, **_: object):
        answers = {}
        for i, message in enumerate(messages):
            worker = self.workers[(self.exchanges + i) % len(self.workers)]
            reply, outcome = reply_for(message, worker.handle)
            self.outcomes.append(
                reply.content["status"]["outcome"] if reply.has_content() else outcome
            )
            answers[message.metadata.dst_node_id] = reply
        self.exchanges += 1
        return answers


def runtime_rounds(monkeypatch: pytest.MonkeyPatch, cfg: RunConfig) -> LoopbackRuntime:
    """`fedit simulate-ray`'s ServerApp over two loopback workers."""
    for name, value in (("_run_id", 7), ("_task_id", 8), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    side, num_clients = simulation_runtime._coordinator_side(cfg)
    loopback = LoopbackRuntime([RuntimeOwners(cfg, threads=1) for _ in range(2)], num_clients)
    monkeypatch.setattr(coordinator, "exchange", loopback.exchange)
    server = simulation_runtime._Server(cfg, side, [], num_clients, show_progress=False)
    server.main(loopback, context=None)  # type: ignore[arg-type]
    assert server.final == Path(cfg.output_dir) / f"round_{cfg.federation.rounds:04d}"
    return loopback


def assert_same_adapters(a: Path, b: Path, rounds: int) -> None:
    for n in range(1, rounds + 1):
        name = f"round_{n:04d}/adapter_model.safetensors"
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), (n, key)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def three_clients(model_dir: Path, out: Path, **extra: object) -> RunConfig:
    values = {
        "partition.num_clients": 3,
        "federation.rounds": 2,
        "federation.clients_per_round": 3,
        **extra,
    }
    return load_config(None, tiny_run_overrides(model_dir, out, **values))


# The paths where a worker differs from an owner (the config for a run directory):
CONFIGS = {
    # c_k kept on the workers' shared disk
    "scaffold": lambda d, out: three_clients(d, out, **{"strategy.name": "scaffold"}),
    # π_ref = the starting model: a worker that trained another client first must put the
    # starting adapter back before computing it
    "dpo-start-reference": lambda d, out: dpo_config(
        d, out, **{"dpo.reference": "sft", "dpo.sft_rounds": 0, "federation.rounds": 2}
    ),
    # π_ref = the SFT-end model, computed by one worker, read from disk by the other
    "sft-then-dpo": lambda d, out: three_clients(
        d,
        out,
        **{
            "train.objective": "sft_then_dpo",
            "data.preference_path": "synthetic",
            "dpo.reference": "sft",
            "dpo.sft_rounds": 1,
            "federation.rounds": 3,
            "dpo.beta": 0.5,
        },
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_runtime_trains_what_the_simulation_trains(
    name: str, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    sim = CONFIGS[name](tiny_model_dir, tmp_path / "sim")
    ray = CONFIGS[name](tiny_model_dir, tmp_path / "ray")
    Simulation(sim, show_progress=False).run()
    loopback = runtime_rounds(monkeypatch, ray)
    assert_same_adapters(tmp_path / "sim", tmp_path / "ray", sim.federation.rounds)
    # the workers never lacked a client's state: no re-sent rounds
    assert loopback.outcomes == ["ok"] * 3 * sim.federation.rounds
    assert [w.model_loads for w in loopback.workers] == [1, 1]
    for a, b in zip(metrics(tmp_path / "sim")[1:], metrics(tmp_path / "ray")[1:], strict=True):
        assert [c["id"] for c in a["clients"]] == [c["id"] for c in b["clients"]]
        for x, y in zip(a["clients"], b["clients"], strict=True):
            assert (x["bytes_down"], x["bytes_up"]) == (y["bytes_down"], y["bytes_up"])


# ---- under Ray ----


def ray_processes(marker: str) -> list[int]:
    """Processes whose command line names `marker` (Ray's temp dir: raylet, GCS, workers)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(
                errors="replace"
            ):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def listening_addresses(pids: list[int]) -> set[str]:
    """The local addresses the processes `pids` listen on (TCP, IPv4 and IPv6, from
    /proc/net: no tool needed)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                addresses.add(_address(fields[1].split(":")[0]))
    return addresses


def _address(hex_ip: str) -> str:
    """/proc/net's hex address (32-bit words in host order) as text; an IPv4-mapped IPv6
    address as its IPv4."""
    raw = bytes.fromhex(hex_ip)
    address = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


@dataclass
class RayRun:
    returncode: int
    output: str
    listening: set[str]  # every address a process of the run listened on


@pytest.fixture
def ray_tmp() -> Iterator[str]:
    """Ray's temp dir for one run: a short path (its unix sockets live there, and a socket
    path is limited to 107 bytes), named in the command line of every Ray process."""
    pytest.importorskip("ray", reason="fedit simulate-ray needs the ray extra")
    path = tempfile.mkdtemp(prefix="fedit-ray-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def simulate_ray(ray_tmp: str, log: Path, options: list[str], overrides: list[str]) -> RayRun:
    """`fedit simulate-ray` in its own session, its listening sockets sampled while it
    runs; asserts that no Ray process outlives it."""
    argv = [sys.executable, "-m", "fedit.cli.main", "simulate-ray", "--quiet", *options]
    argv += [arg for o in overrides for arg in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": FEDIT_SRC, "OMP_NUM_THREADS": "1", "RAY_TMPDIR": ray_tmp}
    listening: set[str] = set()
    with log.open("w") as sink:
        child = subprocess.Popen(
            argv, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 300
            while child.poll() is None:
                assert time.monotonic() < deadline, f"simulate-ray did not finish: {log}"
                listening |= listening_addresses([child.pid, *ray_processes(ray_tmp)])
                time.sleep(0.5)
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    # Ray's own processes end with the command (poll: the raylet exits a moment after)
    deadline = time.monotonic() + 30
    while (left := ray_processes(ray_tmp)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], f"Ray processes left running: {left}"
    return RayRun(child.returncode, log.read_text(), listening)


def three_client_overrides(model_dir: Path, out: Path) -> list[str]:
    return tiny_run_overrides(
        model_dir,
        out,
        **{"partition.num_clients": 3, "federation.rounds": 2, "federation.clients_per_round": 3},
    )


@pytest.mark.deploy
def test_simulate_ray_trains_what_the_simulation_trains(
    ray_tmp: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """2 rounds, 3 clients, FedAvg, two Ray workers of one CPU: the run directory of
    `fedit train`, every client in every round, the simulation's adapter bit for bit, the
    model loaded once per worker, nothing listening beyond 127.0.0.1, no process left."""
    out = tmp_path / "ray"
    overrides = three_client_overrides(tiny_model_dir, out)
    options = ["--workers", "2", "--cpus-per-client", "1", "--object-store-mb", "100"]
    run = simulate_ray(ray_tmp, tmp_path / "simulate-ray.log", options, overrides)
    assert run.returncode == 0, run.output
    assert run.listening and run.listening <= {"127.0.0.1"}, run.listening

    # the run directory `fedit train` writes
    assert {"config.toml", "metrics.jsonl", "round_0001", "round_0002"} <= {
        p.name for p in out.iterdir()
    }
    for n in (1, 2):
        assert (out / f"round_{n:04d}" / "adapter_model.safetensors").is_file()
    lines = metrics(out)
    assert [line["round"] for line in lines] == [0, 1, 2]
    assert all([c["id"] for c in line["clients"]] == [0, 1, 2] for line in lines[1:])
    # each worker loaded the model once and kept it for every message it served
    workers = [json.loads(p.read_text()) for p in (out / "federation" / "workers").glob("*")]
    assert 1 <= len(workers) <= 2
    assert [w["model_loads"] for w in workers] == [1] * len(workers)
    assert sum(w["messages"] for w in workers) == 6
    assert "base model loads per worker" in run.output

    sim = load_config(None, [*overrides, f'output_dir="{tmp_path / "sim"}"'])
    Simulation(sim, show_progress=False).run()
    assert_same_adapters(tmp_path / "sim", out, 2)


@pytest.mark.deploy
def test_a_runtime_that_cannot_start_ends_with_its_reason(
    ray_tmp: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Ray refuses an object store of a petabyte: the command ends at once with Ray's
    reason on one line and exit code 2, not after deploy.join_timeout with the rounds
    waiting for workers that never started."""
    overrides = three_client_overrides(tiny_model_dir, tmp_path / "ray")
    options = ["--workers", "1", "--object-store-mb", str(10**9)]
    run = simulate_ray(ray_tmp, tmp_path / "simulate-ray.log", options, overrides)
    assert run.returncode == 2, run.output
    last = run.output.strip().splitlines()[-1]
    assert last.startswith("error: Flower's simulation runtime failed: ValueError"), last
