"""Scoring benchmark: greedy generation of the demo comparison's held-out answers, the way
fedit scores (adapter merged into the base, left-padded batches of eval.batch_size)
against the unmerged adapter, batched and one prompt at a time, in one run.

The models are those `fedit compare -c configs/demo.toml` trained (runs/demo/<name>/, the
README's main job: run it first). Per model and mode: generation seconds for the 50
held-out prompts (model loading not counted), and whether the answers and exact match are
the same as fedit's. Everything runs in this one process, one mode after the other.

    .venv/bin/python bench/scoring.py                       # fedit, centralized, local-0
    .venv/bin/python bench/scoring.py --models fedit --modes merged-batched,unmerged-single

Prints a markdown table; raw results go to bench/results/scoring-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from harness import REPO, machine_info, markdown_table, publish, warn_if_busy

MODES = ("merged-batched", "unmerged-batched", "unmerged-single")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--models", default="fedit,centralized,local-0")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    warn_if_busy()

    import torch
    from peft import PeftModel

    from fedit.config import load_config
    from fedit.data.prepare import load_heldout
    from fedit.engine.checkpoint import completed_rounds, round_dir
    from fedit.eval.attack import record_generator
    from fedit.eval.exact_match import score_by_category
    from fedit.models.inference import load_for_inference

    rows, results = [], []
    for name in args.models.split(","):
        run = args.runs / name
        rounds = completed_rounds(run)
        if not rounds:
            sys.exit(f"{run}: no rounds; run `fedit compare -c configs/demo.toml` first")
        adapter = round_dir(run, rounds[-1])
        cfg = load_config(adapter / "config.toml")
        heldout = load_heldout(cfg)
        torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
        answers_by_mode = {}
        for mode in args.modes.split(","):
            tokenizer, model = load_for_inference(cfg, adapter)
            if mode.startswith("merged"):
                assert isinstance(model, PeftModel)
                model = model.merge_and_unload()
            batch = cfg.eval.batch_size if mode.endswith("batched") else 1
            generate = record_generator(
                model, tokenizer, replace(cfg, eval=replace(cfg.eval, batch_size=batch))
            )
            started = time.perf_counter()
            answers = generate(heldout)
            seconds = time.perf_counter() - started
            scores = score_by_category(
                answers, [r.response for r in heldout], [r.category for r in heldout]
            )
            answers_by_mode[mode] = answers
            first = answers_by_mode[next(iter(answers_by_mode))]
            same = sum(a == b for a, b in zip(answers, first, strict=True)) / len(answers)
            results.append(
                {
                    "model": name,
                    "mode": mode,
                    "prompts": len(heldout),
                    "batch_size": batch,
                    "seconds": seconds,
                    "exact_match": scores["mean"],
                    "same_answers_as_first_mode": same,
                }
            )
            rows.append(
                [
                    name,
                    mode,
                    str(batch),
                    f"{seconds:.1f}",
                    f"{scores['mean']:.2f}",
                    f"{same:.2f}",
                ]
            )
            print(f"{name} {mode}: {seconds:.1f}s", file=sys.stderr)
    table = markdown_table(
        ["model", "mode", "batch", "generation s", "exact match", "same answers as 1st mode"], rows
    )
    publish("scoring", {"machine": machine_info(), "results": results}, table)


if __name__ == "__main__":
    main()
