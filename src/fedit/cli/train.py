"""`fedit train`: run a federation (or the local / centralized baseline) from a config."""

from __future__ import annotations

from fedit.cli.common import (
    ConfigOption,
    OverrideOption,
    QuietOption,
    ResumeOption,
    friendly_errors,
    resolve_config,
)


@friendly_errors
def train(
    config: ConfigOption = None,
    set_: OverrideOption = None,
    resume: ResumeOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train: federated.mode = federated | local | centralized (see configs/)."""
    cfg = resolve_config(config, set_)
    from fedit.engine.simulation import Simulation  # torch & co. only once a run starts

    Simulation(cfg, show_progress=not quiet).run(resume=resume)
