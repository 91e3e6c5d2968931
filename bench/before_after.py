"""Before / after: the benchmark figures a restructuring must leave unchanged, for two source
trees measured side by side in one invocation.

"before" is a revision (default: the merge base of HEAD and main), checked out into a
temporary `git worktree` that is removed at the end; "after" is this working tree, with
its uncommitted changes. Both run the same bench scripts (this tree's), on the same model
and records; only the fedit their children import differs (PYTHONPATH, harness.run_child).
The runs alternate between the trees, the first tree flipping with each workload, so
that drift in the machine's speed reaches both:

  W0 fedit         bench/w0.py's fedit child: outside-steps ms per client-round
  W1 reference     bench/w1.py's plain reference loop (it imports fedit's tokenisation,
                   selection and held-out loss, so it runs per tree too)
  W1 fedit-all     bench/w1.py's fedit-all variant: its wall / the same tree's reference's

    .venv/bin/python bench/before_after.py                     # on a branch: vs its merge base
    .venv/bin/python bench/before_after.py --before 239577e    # vs issue 27's start (~17-23 min)
    .venv/bin/python bench/before_after.py --quick             # smoke run (~2 min)
    .venv/bin/python bench/before_after.py --rounds 2 --steps 2  # W1 (and W0) scaled down

Prints a markdown table to stdout; raw results go to bench/results/before-after-<UTC>.json.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import w0
import w1
from harness import REPO, machine_info, markdown_table, publish, warn_if_busy

TREES = ("before", "after")


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def describe_after() -> str:
    """HEAD's short hash, marked where the working tree holds uncommitted changes."""
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", "HEAD") + (" + changes" if dirty else "")


def w0_job(src: Path, workdir: Path, args: argparse.Namespace) -> dict:
    command = w0.fedit_command(workdir, args.w0_rounds, args.w0_clients_per_round)
    return w0.measure(command, workdir, src)


def w1_job(variant: str) -> Callable[[Path, Path, argparse.Namespace], dict]:
    def job(src: Path, workdir: Path, args: argparse.Namespace) -> dict:
        scale = {k: getattr(args, k) for k in ("rounds", "clients_per_round", "steps")}
        result = w1.run_variant(variant, argparse.Namespace(**scale, src=str(src)))
        if "error" in result:
            raise RuntimeError(f"W1 {variant} failed: {result['error']}")
        return result | w1.derived(result)

    return job


JOBS = {
    "W0 fedit": w0_job,
    "W1 reference": w1_job("reference"),
    "W1 fedit-all": w1_job("fedit-all"),
}


def run_alternating(sources: dict[str, Path], workdir: Path, args) -> dict[str, dict]:
    """{tree: {job: result}}, each job run for both trees back to back, the tree that goes
    first alternating from job to job."""
    results: dict[str, dict] = {tree: {} for tree in TREES}
    for i, (job_name, job) in enumerate(JOBS.items()):
        for tree in TREES if i % 2 == 0 else TREES[::-1]:
            print(f"running {job_name} on {tree} ...", file=sys.stderr, flush=True)
            results[tree][job_name] = job(sources[tree], workdir, args)
    return results


def summary(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """The two figures per tree, and the walls the W1 ratio is made of."""
    out = {}
    for tree, jobs in results.items():
        reference, fedit_all = jobs["W1 reference"], jobs["W1 fedit-all"]
        out[tree] = {
            "w0_outside_ms_per_client_round": jobs["W0 fedit"]["outside_ms_per_client_round"],
            "w1_reference_wall": reference["wall_seconds"],
            "w1_fedit_all_wall": fedit_all["wall_seconds"],
            "w1_fedit_all_ratio": fedit_all["wall_seconds"] / reference["wall_seconds"],
        }
    return out


def table(figures: dict[str, dict[str, float]], revisions: dict[str, str], machine) -> str:
    rows = [
        [
            tree,
            revisions[tree],
            f"{f['w0_outside_ms_per_client_round']:.1f}",
            f"{f['w1_fedit_all_wall']:.1f} / {f['w1_reference_wall']:.1f}",
            f"{f['w1_fedit_all_ratio']:.3f}",
        ]
        for tree, f in figures.items()
    ]
    before, after = figures["before"], figures["after"]
    w0_key, w1_key = "w0_outside_ms_per_client_round", "w1_fedit_all_ratio"
    change = [f"{after[key] / before[key]:.2f}" for key in (w0_key, w1_key)]
    rows.append(["after / before", "", change[0], "", change[1]])
    header = [
        "tree", "revision", "W0 outside steps ms / client-round",
        "W1 fedit-all wall s / reference wall s", "W1 fedit-all / reference",
    ]  # fmt: skip
    load = ", ".join(f"{x:.1f}" for x in machine["load_average_at_start"])
    return markdown_table(header, rows) + (
        f"\n\nmachine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB; "
        f"Python {machine['python']}, torch {machine['torch']}, transformers "
        f"{machine['transformers']}, peft {machine['peft']}; load at start {load}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="W0 and W1's figures, before and after.")
    parser.add_argument("--before", help="the revision to compare with (default: merge base)")
    parser.add_argument("--rounds", type=int, help="federation rounds of both (W0 20, W1 4)")
    parser.add_argument("--clients-per-round", type=int, help="of both (W0 5, W1 2)")
    parser.add_argument("--steps", type=int, help="W1's steps per client-round (1 epoch = 5)")
    parser.add_argument("--quick", action="store_true", help="smoke run: W0 2x2, W1 1x1x1")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.clients_per_round, args.steps = 1, 1, 1
    # W0's child needs rounds of at least 2 to see rounds after the first; --quick: 2 x 2
    args.w0_rounds = 2 if args.quick else args.rounds
    args.w0_clients_per_round = 2 if args.quick else args.clients_per_round
    args.before = args.before or git("merge-base", "HEAD", "main")
    if git("rev-parse", args.before) == git("rev-parse", "HEAD") and "+" not in describe_after():
        parser.error(f"before ({args.before[:7]}) is this very tree: pass --before REV")
    return args


def main() -> None:
    args = parse_args()
    revisions = {"before": git("rev-parse", "--short", args.before), "after": describe_after()}
    w1.convert_embedded_model()
    warn_if_busy()
    machine = machine_info()
    scratch = Path(tempfile.mkdtemp(prefix="fedit-before-after-"))
    checkout, workdir = scratch / "before", scratch / "w0"
    try:
        git("worktree", "add", "--detach", str(checkout), args.before)
        w0.write_tiny_model(workdir / "model")
        w0.write_first_records(workdir / "records.jsonl")
        sources = {"before": checkout / "src", "after": REPO / "src"}
        results = run_alternating(sources, workdir, args)
    finally:
        if checkout.exists():
            git("worktree", "remove", "--force", str(checkout))
        shutil.rmtree(scratch, ignore_errors=True)
    figures = summary(results)
    arguments = {k: v for k, v in vars(args).items() if not k.startswith("w0_")}
    payload = {
        "workload": "before-after",
        "machine": machine,
        "args": arguments,
        "revisions": revisions,
        "figures": figures,
        "results": results,
    }
    publish("before-after", payload, table(figures, revisions, machine))


if __name__ == "__main__":
    main()
