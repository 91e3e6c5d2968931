"""Helpers shared by the benchmark scripts: child processes, disk usage, machine facts.

Each measured run happens in its own child process so that its peak RSS is its own; the
child prints one JSON line last on stdout, which `run_child` returns as a dict.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
W1_CONFIG = REPO / "bench" / "configs" / "w1.toml"


def run_child(args: list[str], src: str | Path | None = None) -> dict:
    """Run `python <args>` from the repo root; return the JSON of its last stdout line.
    `src`: a source tree (a checkout's src/) the child imports fedit from, in place of the
    installed one (bench/before_after.py measures two trees this way)."""
    env = dict(os.environ)
    if src is not None:
        paths = [str(Path(src).resolve()), env.get("PYTHONPATH")]  # children run in REPO
        env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}:\n{tail}")
    return json.loads(lines[-1])


def peak_rss_kib() -> int:
    """This process's peak resident set size in KiB.

    Linux's VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve, so a child
    spawned by a parent holding 700 MiB reports at least 700 MiB whatever it used itself.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS


def warm_w1_trainer(overrides: list[str]) -> tuple:
    """fedit's trainer on W1's first client after one warm-up step, for timing or profiling
    the steps that follow: (config, LoRA model, the client's examples, train_client's
    keyword arguments). The config is bench/configs/w1.toml with `overrides`, on all cores."""
    from dataclasses import replace

    import torch
    from reference_loop import W1_DIR, load_w1  # reference_loop imports this module

    from fedit.client.trainer import train_client
    from fedit.config import load_config
    from fedit.models.adapters import attach_lora
    from fedit.models.loading import load_model, load_tokenizer

    cfg = load_config(W1_CONFIG, [f"train.threads={os.cpu_count()}", *overrides])
    torch.set_num_threads(cfg.train.threads)
    tokenizer = load_tokenizer(cfg.model)
    clients, _ = load_w1(W1_DIR, tokenizer)
    model = attach_lora(load_model(cfg.model), cfg.lora, cfg.seed)
    kwargs = {"client_id": 0, "learning_rate": cfg.train.learning_rate}
    kwargs["pad_id"] = tokenizer.pad_token_id
    train_client(model, clients[0], replace(cfg.train, max_steps=1), seed=0, **kwargs)
    return cfg, model, clients[0], kwargs


def dir_usage(path: Path) -> tuple[int, int]:
    """(files, bytes) under `path`: what a run left on disk."""
    sizes = [p.stat().st_size for p in Path(path).rglob("*") if p.is_file()]
    return len(sizes), sum(sizes)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """What a result must be read against: CPU, cores, RAM, library versions, load."""
    import peft
    import torch
    import transformers

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(ram / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def warn_if_busy() -> None:
    """Timings on a shared machine are 3-10x slower and noisy; say so before starting."""
    load = os.getloadavg()[0]
    if load >= 0.5:
        print(
            f"warning: 1-minute load average is {load:.1f}; timings will be noisy "
            "(benchmark on a quiet machine)",
            file=sys.stderr,
        )


def utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def write_results(name: str, payload: dict) -> Path:
    """bench/results/<name>-<UTC timestamp>.json"""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{utc_stamp()}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def publish(name: str, payload: dict, table: str) -> None:
    """Every script's ending: its results file written, its table and the file's name shown."""
    path = write_results(name, payload)
    print(table)
    print(f"\nraw results: {path.relative_to(REPO)}")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
