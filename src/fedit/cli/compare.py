"""`fedit compare`: Base vs Local vs FedIT vs Centralised on one config (the FedIT paper's
comparison); `configs/demo.toml` makes it the built-in multi-skill demo."""

from __future__ import annotations

import time
from pathlib import Path

from rich.markup import escape

from fedit.cli.common import ConfigOption, OverrideOption, console, friendly_errors, resolve_config


@friendly_errors
def compare(config: ConfigOption = None, set_: OverrideOption = None) -> None:
    """Train and score every model in eval.compare; tables and charts go to output_dir."""
    started = time.perf_counter()
    cfg = resolve_config(config, set_)
    from fedit.experiments.compare import run_comparison  # torch & co. only once a run starts

    out_dir = Path(cfg.output_dir)
    run_comparison(cfg, cfg.eval.compare, out_dir)
    console.print((out_dir / "scores.md").read_text(), markup=False)  # category names
    minutes = (time.perf_counter() - started) / 60
    where = escape(str(out_dir))
    console.print(
        f"[bold green]done in {minutes:.1f} min[/]: tables in {where}/scores.md, charts "
        f"{where}/*.png, per-model runs and adapters under {where}/<model>/"
    )
