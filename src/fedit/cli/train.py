"""`fedit train`: run a federation (or the local / centralized baseline) from a config."""

from __future__ import annotations

from typing import Annotated

import typer

from fedit.cli.common import ConfigOption, OverrideOption, friendly_errors, resolve_config


@friendly_errors
def train(
    config: ConfigOption = None,
    set_: OverrideOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue after the last completed round")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars")] = False,
) -> None:
    """Train: federated.mode = federated | local | centralized (see configs/)."""
    cfg = resolve_config(config, set_)
    from fedit.engine.simulation import Simulation  # torch & co. only once a run starts

    Simulation(cfg, show_progress=not quiet).run(resume=resume)
