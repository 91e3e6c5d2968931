"""What torch.compile would give fedit's local training: W1's steps eager and compiled.

fedit's trainer (bench/configs/w1.toml with fedit's defaults and the 1,024-token cap per
forward) on W1's first client: `--steps` timed steps eager, then each decoder layer
compiled (``nn.Module.compile(dynamic=True)``: the layers share their code, and batches of
varying length would otherwise recompile per shape), a few warm-up steps that pay for
compilation, and the same timed steps compiled. A federation pays the compilation once
per process, so it pays off only if what the compiled steps save over a run exceeds it.

    .venv/bin/python bench/compile_steps.py
    .venv/bin/python bench/compile_steps.py --steps 20 --warm-steps 5

Prints a markdown table; raw results go to bench/results/compile-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from harness import machine_info, markdown_table, publish, warm_w1_trainer, warn_if_busy

from fedit.client.trainer import train_client

TOKEN_CAP = ["train.max_tokens_per_forward=1024"]  # as bench/w1.py's fedit-all


def timed_steps(model, examples, cfg, kwargs: dict, steps: int, seed: int) -> dict:
    update = train_client(model, examples, replace(cfg.train, max_steps=steps), seed=seed, **kwargs)
    return {"step_seconds": update.metrics["step_seconds"], "loss": update.metrics["train_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps, eager and compiled")
    parser.add_argument("--warm-steps", type=int, default=3, help="steps that compile")
    args = parser.parse_args()
    warn_if_busy()
    cfg, model, examples, kwargs = warm_w1_trainer(TOKEN_CAP)
    eager = timed_steps(model, examples, cfg, kwargs, args.steps, seed=1)
    started = time.perf_counter()
    for layer in model.get_base_model().model.layers:
        layer.compile(dynamic=True)
    timed_steps(model, examples, cfg, kwargs, args.warm_steps, seed=5)
    compile_seconds = time.perf_counter() - started
    compiled = timed_steps(model, examples, cfg, kwargs, args.steps, seed=1)
    saved = (eager["step_seconds"] - compiled["step_seconds"]) / args.steps
    rows = [
        ["eager", f"{eager['step_seconds']:.2f}", "-"],
        ["compiled", f"{compiled['step_seconds']:.2f}", f"{compile_seconds:.1f}"],
    ]
    # no loss column: the compiled steps train a model the eager ones already moved
    header = [f"{args.steps} steps", "seconds", "compile + warm-up s"]
    payload = {"machine": machine_info(), "args": vars(args), "eager": eager}
    payload |= {"compiled": compiled, "compile_seconds": compile_seconds}
    payload["steps_to_break_even"] = compile_seconds / saved if saved > 0 else None
    publish("compile", payload, markdown_table(header, rows))


if __name__ == "__main__":
    main()
