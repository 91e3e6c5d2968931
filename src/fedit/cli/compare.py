"""`fedit compare`: Base vs Local vs FedIT vs Centralised on one config (the FedIT paper's
comparison); `configs/demo.toml` makes it the built-in multi-skill demo."""

from __future__ import annotations

import time
from pathlib import Path

from fedit.cli.common import ConfigOption, OverrideOption, console, friendly_errors, resolve_config
from fedit.engine.compare import run_comparison


@friendly_errors
def compare(config: ConfigOption = None, set_: OverrideOption = None) -> None:
    """Train and score every model in eval.compare; tables and charts go to output_dir."""
    started = time.perf_counter()
    cfg = resolve_config(config, set_)
    out_dir = Path(cfg.output_dir)
    run_comparison(cfg, cfg.eval.compare, out_dir)
    console.print((out_dir / "scores.md").read_text())
    minutes = (time.perf_counter() - started) / 60
    console.print(
        f"[bold green]done in {minutes:.1f} min[/]: tables in {out_dir / 'scores.md'}, charts "
        f"{out_dir / '*.png'}, per-model runs and adapters under {out_dir}/<model>/"
    )
