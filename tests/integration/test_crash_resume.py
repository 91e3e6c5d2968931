"""Crash injection: a run killed anywhere resumes to exactly what an uninterrupted run writes.

A kill is simulated in-process by making the function at the kill point raise ``Kill``, a
BaseException no code catches: like SIGKILL, the process leaves behind only what it had
written (the engine's ``except OSError`` cleanups do not catch it, and no ``finally`` on
the way out writes a file). One case sends a real SIGKILL to a ``fedit train`` process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedit.client import session
from fedit.client.releases import RELEASES_DIR
from fedit.config import RunConfig, load_config
from fedit.engine import checkpoint, rounds
from fedit.engine.rounds import RoundLoop
from fedit.engine.simulation import Simulation
from tests.conftest import REPO, tiny_run_overrides

# metrics fields that measure wall-clock time; everything else must match exactly
WALL_CLOCK = {"seconds", "step_seconds", "eval_seconds", "reference_seconds"}

STRATEGIES: dict[str, dict[str, object]] = {
    "fedavg": {},
    "fedadam": {
        "strategy.name": "fedadam",
        "strategy.server_lr": 0.01,
        "strategy.lora_aggregation": "exact",
    },
    # > SPILL_THRESHOLD (64) clients: the c_k are kept on disk
    "scaffold70": {
        "strategy.name": "scaffold",
        "partition.method": "iid",
        "partition.num_clients": 70,
        "federation.clients_per_round": 3,
    },
}


class Kill(BaseException):
    """The process dies here (not an Exception: nothing catches it)."""


def config(model_dir: Path, output_dir: Path, strategy: str, **extra: object) -> RunConfig:
    values = {**STRATEGIES[strategy], "train.max_steps": 1, **extra}
    return load_config(None, tiny_run_overrides(model_dir, output_dir, **values))


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The uninterrupted 3-round run of each strategy, run once per module."""
    runs: dict[str, Path] = {}

    def get(strategy: str) -> Path:
        if strategy not in runs:
            out = tmp_path_factory.mktemp(f"straight-{strategy}")
            Simulation(config(tiny_model_dir, out, strategy), show_progress=False).run()
            runs[strategy] = out
        return runs[strategy]

    return get


def tensor_files(run_dir: Path) -> dict[str, bytes]:
    """Every tensor file (adapters, server state, residuals, client state) and state.json;
    local DP's releases by their tensors only (their metadata holds wall-clock seconds)."""
    return {
        str(p.relative_to(run_dir)): _tensor_bytes(p) if RELEASES_DIR in p.parts else p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.suffix == ".safetensors" or p.name == "state.json"
    }


def _tensor_bytes(path: Path) -> bytes:
    return b"".join(t.numpy().tobytes() for _, t in sorted(load_file(path).items()))


def metric_lines(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [without_wall_clock(json.loads(line)) for line in lines]


def without_wall_clock(value):
    if isinstance(value, dict):
        return {k: without_wall_clock(v) for k, v in value.items() if k not in WALL_CLOCK}
    if isinstance(value, list):
        return [without_wall_clock(v) for v in value]
    return value


def assert_same_run(resumed: Path, straight: Path) -> None:
    got, expected = tensor_files(resumed), tensor_files(straight)
    assert got.keys() == expected.keys()
    assert [name for name in got if got[name] != expected[name]] == []
    assert metric_lines(resumed) == metric_lines(straight)
    assert not list(resumed.glob(".tmp*"))


# --- kill points: each patches one function to die at a given round (1-based) ---------


def current_round(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """The round (1-based) the engine is in, as last passed to round_candidates."""
    state = {"round": 0}
    select = rounds.round_candidates

    def tracked(cfg, num_clients, seed, round_index):
        state["round"] = round_index + 1
        return select(cfg, num_clients, seed, round_index)

    monkeypatch.setattr(rounds, "round_candidates", tracked)
    return lambda: state["round"]


def kill_in_training(monkeypatch, at_round: int, client_number: int) -> None:
    """During the `client_number`-th (1-based) client's local training of round `at_round`."""
    now, train, calls = current_round(monkeypatch), session.train_client, []

    def dying(*args, **kwargs):
        if now() == at_round:
            calls.append(1)
            if len(calls) == client_number:
                raise Kill
        return train(*args, **kwargs)

    monkeypatch.setattr(session, "train_client", dying)


def kill_after_aggregation(monkeypatch, at_round: int) -> None:
    """Right after strategy.aggregate of round `at_round` returned (server state updated)."""
    build = rounds.build_strategy

    def building(config, num_clients, aggregator):
        strategy = build(config, num_clients, aggregator)
        aggregate = strategy.aggregate

        def dying(global_state, updates, round_index):
            result = aggregate(global_state, updates, round_index)
            if round_index + 1 == at_round:
                raise Kill
            return result

        strategy.aggregate = dying
        return strategy

    monkeypatch.setattr(rounds, "build_strategy", building)


def kill_mid_checkpoint(monkeypatch, at_round: int) -> None:
    """In the checkpoint of round `at_round`, after the adapter is written in staging."""
    save = checkpoint.save_file
    staging = f"tmp-round_{at_round:04d}"

    def dying(tensors, filename, *args, **kwargs):
        if staging in str(filename):
            raise Kill
        return save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", dying)


def kill_before_metrics(monkeypatch, at_round: int) -> None:
    """After round `at_round`'s checkpoint is committed, before its metrics line is written."""
    write = RoundLoop._write_metrics

    def dying(self, record):
        if record["round"] == at_round:
            raise Kill
        return write(self, record)

    monkeypatch.setattr(RoundLoop, "_write_metrics", dying)


def kill_mid_metrics_line(monkeypatch, at_round: int) -> None:
    """Half-way through appending round `at_round`'s metrics line (a truncated last line)."""
    write = RoundLoop._write_metrics

    def dying(self, record):
        if record["round"] == at_round:
            with (self.output_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record)[:40])
            raise Kill
        return write(self, record)

    monkeypatch.setattr(RoundLoop, "_write_metrics", dying)


KILL_POINTS = {
    "round1-training": lambda mp: kill_in_training(mp, at_round=1, client_number=1),
    "round2-second-client": lambda mp: kill_in_training(mp, at_round=2, client_number=2),
    "after-aggregation": lambda mp: kill_after_aggregation(mp, at_round=2),
    "mid-checkpoint": lambda mp: kill_mid_checkpoint(mp, at_round=2),
    "before-metrics": lambda mp: kill_before_metrics(mp, at_round=2),
    "mid-metrics-line": lambda mp: kill_mid_metrics_line(mp, at_round=2),
    "mid-last-metrics-line": lambda mp: kill_mid_metrics_line(mp, at_round=3),
}


@pytest.mark.parametrize("kill_point", sorted(KILL_POINTS))
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_killed_run_resumes_exactly(
    tiny_model_dir: Path, tmp_path: Path, uninterrupted, strategy: str, kill_point: str
) -> None:
    # Prepare
    cfg = config(tiny_model_dir, tmp_path / "run", strategy)
    with pytest.MonkeyPatch.context() as mp:
        KILL_POINTS[kill_point](mp)
        with pytest.raises(Kill):
            Simulation(cfg, show_progress=False).run()

    # Execute
    Simulation(cfg, show_progress=False).run(resume=True)

    # Assert
    assert_same_run(tmp_path / "run", uninterrupted(strategy))


def test_sigkilled_cli_run_resumes_exactly(
    tiny_model_dir: Path, tmp_path: Path, uninterrupted
) -> None:
    # Prepare: `fedit train` in a child process, each client slowed by 0.3 s so that the
    # kill lands in the middle of the run, not after it
    out = tmp_path / "run"
    overrides = tiny_run_overrides(
        tiny_model_dir, out, **STRATEGIES["scaffold70"], **{"train.max_steps": 1}
    )
    overrides.append("train.threads=1")  # as this process runs (tests/conftest.py)
    slowed = (
        "import sys, time\n"
        "from fedit.client import session\n"
        "train = session.train_client\n"
        "session.train_client = lambda *a, **k: (time.sleep(0.3), train(*a, **k))[1]\n"
        "from fedit.cli.main import app\n"
        "sys.argv[0] = 'fedit'\n"
        "app()\n"
    )
    args = [sys.executable, "-c", slowed, "train", "--quiet"]
    args += [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600  # a guard against a hung child, not a timing check
    try:
        while not (out / "round_0001").exists() and child.poll() is None:
            assert time.monotonic() < deadline, "fedit train never finished round 1"
            time.sleep(0.01)
        assert child.poll() is None, child.stderr.read().decode()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not (out / "round_0003").exists()  # killed mid-run

    # Execute
    cfg = load_config(None, overrides)
    Simulation(cfg, show_progress=False).run(resume=True)

    # Assert
    assert_same_run(out, uninterrupted("scaffold70"))
