"""Deployment benchmark: what running W0's clients as a real federation costs over simulating it.

W0's data, model and training (bench/w0.py, bench/configs/w0.toml: the first 2,000 Dolly
records in 100 category shards, a random 2-layer Llama with SmolLM2's tokenizer, batch 8,
fp32), with its first five clients as five data owners, all five every round for 20 rounds.
The same config runs twice, one after the other, each party with one torch thread:

- simulation: `fedit train`, the five clients one after another in one process;
- deployment: `fedit coordinate` and five `fedit join` processes on 127.0.0.1 with TLS and
  node authentication (fedit's own dev CA and node keys), each owner with only its file.

Reported from metrics.jsonl and the owners' logs: time outside optimizer steps per
client-round (in the deployment the owners train at the same time, so a round's steps take
as long as its slowest owner's), the owners' own time outside steps per round, bytes down
and up per client-round (what crossed the wire vs what the simulation says would), base
model loads per owner process, and whether both runs end on the same global adapter.

    .venv/bin/python bench/deploy.py            # 20 rounds (a few minutes on 2 cores)
    .venv/bin/python bench/deploy.py --quick    # 2 rounds

Prints a markdown table; raw results go to bench/results/deploy-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

from harness import REPO, machine_info, markdown_table, publish, warn_if_busy
from w0 import CONFIG, write_first_records, write_tiny_model

OWNERS = 5
LOADS = re.compile(r"base model loads: (\d+)")


def fedit_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedit.cli.main", *args]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def prepare(workdir: Path) -> list[Path]:
    """The tiny model, W0's first five clients' files, a CA and five node keys."""
    from fedit.deploy.pki import make_ca, make_node_key

    write_tiny_model(workdir / "model")
    write_first_records(workdir / "records.jsonl")
    parts = workdir / "parts"
    sets = [f"model.name_or_path={json.dumps(str(workdir / 'model'))}"]
    sets.append(f"data.path={json.dumps(str(workdir / 'records.jsonl'))}")
    subprocess.run(
        fedit_command("partition", "-c", str(CONFIG), "--out", str(parts), *as_sets(sets)),
        check=True, capture_output=True, env=child_env(), cwd=REPO,
    )  # fmt: skip
    (workdir / "owners").mkdir()
    for k in range(OWNERS):
        shutil.copy(parts / f"client_{k}.jsonl", workdir / "owners" / f"client_{k}.jsonl")
    make_ca(workdir / "pki", "localhost", [], force=False)
    keys = [workdir / "pki" / f"owner{k}.key" for k in range(OWNERS)]
    for key in keys:
        make_node_key(key, force=False)
    return keys


def as_sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def run_overrides(workdir: Path, out: Path, rounds: int) -> list[str]:
    values = {
        "output_dir": str(out),
        "model.name_or_path": str(workdir / "model"),
        "data.path": str(workdir / "owners" / "client_*.jsonl"),
        "partition.method": "files",
        "partition.num_clients": OWNERS,
        "federation.clients_per_round": OWNERS,
        "federation.rounds": rounds,
        "eval.every_rounds": rounds,
        "train.threads": 1,
    }
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def simulate(workdir: Path, rounds: int) -> float:
    """`fedit train`; its wall time."""
    sets = as_sets(run_overrides(workdir, workdir / "simulated", rounds))
    started = time.perf_counter()
    subprocess.run(
        fedit_command("train", "-c", str(CONFIG), "--quiet", *sets),
        check=True, capture_output=True, env=child_env(), cwd=REPO,
    )  # fmt: skip
    return time.perf_counter() - started


def deploy(workdir: Path, keys: list[Path], rounds: int) -> tuple[float, list[int]]:
    """`fedit coordinate` and the owners' `fedit join`s; wall time (coordinator start to
    exit) and each owner's base model load count."""
    from fedit.deploy.flower.processes import Child, free_port

    front = f"127.0.0.1:{free_port()}"
    deploy_sets = {
        "deploy.clients": [str(k.with_suffix(".pub")) for k in keys],
        "deploy.certs_dir": str(workdir / "pki"),
        "deploy.fleet_address": front,
        "deploy.min_replies": OWNERS,
    }
    overrides = run_overrides(workdir, workdir / "deployed", rounds)
    overrides += [f"{k}={json.dumps(v)}" for k, v in deploy_sets.items()]
    logs = workdir / "logs"
    command = fedit_command("coordinate", "-c", str(CONFIG), "--quiet", *as_sets(overrides))
    coordinator = Child("coordinator", command, logs / "coordinator.log", child_env())
    owners = []
    started = time.perf_counter()
    with coordinator:
        coordinator.wait_for("fleet front on", 300)
        for k, key in enumerate(keys):
            command = fedit_command(
                "join", "--server", front, "--root-cert", str(workdir / "pki" / "ca.pem"),
                "--key", str(key), "--data", str(workdir / "owners" / f"client_{k}.jsonl"),
                "--state-dir", str(workdir / f"state_{k}"), "--threads", "1",
            )  # fmt: skip
            owners.append(Child(f"owner {k}", command, logs / f"owner_{k}.log", child_env()))
            owners[-1].spawn()
        try:
            while coordinator.exit_code() is None:
                time.sleep(0.5)
            wall = time.perf_counter() - started
        finally:
            for owner in owners:
                owner.stop()
    if coordinator.exit_code() != 0:
        raise RuntimeError(f"fedit coordinate failed:\n{coordinator.log_text()[-3000:]}")
    return wall, [int(LOADS.findall(o.log_text())[-1]) for o in owners]


def rounds_of(run_dir: Path) -> list[dict]:
    lines = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [line for line in lines if line["round"] >= 1]


def critical_steps(lines: list[dict], steps_in_parallel: bool) -> float:
    """Seconds of optimizer steps the rounds waited for: every client's one after another
    in the simulation, the slowest owner's in a deployment (they train at the same time)."""
    combine = max if steps_in_parallel else sum
    return sum(combine(c["step_seconds"] for c in line["clients"]) for line in lines)


def outside_per_client_round(lines: list[dict], steps_in_parallel: bool) -> float:
    rounds_wall = sum(line["seconds"] for line in lines)
    client_rounds = sum(len(line["clients"]) for line in lines)
    return (rounds_wall - critical_steps(lines, steps_in_parallel)) / client_rounds


def summary(lines: list[dict], steps_in_parallel: bool) -> dict:
    """Per client-round figures of one run's metrics lines; "steady" leaves out round 1
    (in a deployment it includes the owners' start: reading their files, loading the model)."""
    clients = [c for line in lines for c in line["clients"]]
    return {
        "rounds": len(lines),
        "client_rounds": len(clients),
        "rounds_seconds": sum(line["seconds"] for line in lines),
        "step_seconds_on_critical_path": critical_steps(lines, steps_in_parallel),
        "outside_steps_per_client_round": outside_per_client_round(lines, steps_in_parallel),
        "steady_outside_steps_per_client_round": outside_per_client_round(
            lines[1:] or lines, steps_in_parallel
        ),
        "client_outside_steps_per_client_round": mean(
            c["seconds"] - c["step_seconds"] for c in clients
        ),
        "bytes_down_per_client_round": mean(c["bytes_down"] for c in clients),
        "bytes_up_per_client_round": mean(c["bytes_up"] for c in clients),
    }


def same_final_adapter(a: Path, b: Path, rounds: int) -> bool:
    name = f"round_{rounds:04d}/adapter_model.safetensors"
    return (a / name).read_bytes() == (b / name).read_bytes()


def table(r: dict) -> str:
    sim, dep = r["simulation"], r["deployment"]
    figures = [
        ("wall (process start to exit)", "wall_seconds", "{:.1f} s"),
        ("sum of the rounds' seconds", "rounds_seconds", "{:.1f} s"),
        ("optimizer steps the rounds waited for", "step_seconds_on_critical_path", "{:.1f} s"),
        ("outside optimizer steps per client-round", "outside_steps_per_client_round", "{:.3f} s"),
        ("the same, rounds 2 on", "steady_outside_steps_per_client_round", "{:.3f} s"),
        (
            "of it in the client's training call",
            "client_outside_steps_per_client_round",
            "{:.3f} s",
        ),
        ("bytes down per client-round", "bytes_down_per_client_round", "{:,.0f}"),
        ("bytes up per client-round", "bytes_up_per_client_round", "{:,.0f}"),
    ]
    rows = [
        ["rounds / client-rounds", *(f"{x['rounds']} / {x['client_rounds']}" for x in (sim, dep))]
    ]
    rows += [[name, fmt.format(sim[key]), fmt.format(dep[key])] for name, key, fmt in figures]
    loads = ", ".join(map(str, r["owner_model_loads"]))
    rows.append(["base model loads per owner process", "1 (the one process)", loads])
    rows.append(["same final global adapter (bytes)", "", str(r["same_final_adapter"])])
    return markdown_table(["W0 clients, 5 owners", "simulation", "deployment"], rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The deployment's cost over the simulation.")
    parser.add_argument("--rounds", type=int, default=20, help="federation rounds (W0: 20)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 2
    return args


def main() -> None:
    args = parse_args()
    warn_if_busy()
    workdir = Path(tempfile.mkdtemp(prefix="fedit-deploy-"))
    try:
        keys = prepare(workdir)
        print("running the simulation ...", file=sys.stderr, flush=True)
        sim_wall = simulate(workdir, args.rounds)
        print("running the deployment ...", file=sys.stderr, flush=True)
        dep_wall, loads = deploy(workdir, keys, args.rounds)
        simulated, deployed = workdir / "simulated", workdir / "deployed"
        result = {
            "simulation": {"wall_seconds": sim_wall, **summary(rounds_of(simulated), False)},
            "deployment": {"wall_seconds": dep_wall, **summary(rounds_of(deployed), True)},
            "owner_model_loads": loads,
            "same_final_adapter": same_final_adapter(simulated, deployed, args.rounds),
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    payload = {
        "workload": "deploy",
        "machine": machine_info(),
        "args": vars(args),
        "result": result,
    }
    publish("deploy", payload, table(result))


if __name__ == "__main__":
    main()
