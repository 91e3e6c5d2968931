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


def run_child(args: list[str]) -> dict:
    """Run `python <args>` from the repo root; return the JSON of its last stdout line."""
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, check=False
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}:\n{tail}")
    return json.loads(lines[-1])


def peak_rss_kib() -> int:
    """This process's peak resident set size (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


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


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
