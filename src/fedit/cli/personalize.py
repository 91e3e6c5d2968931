"""`fedit personalize`: each client's own adapter after a finished federation, scored on the
client's own distribution beside the global adapter and a local-only one."""

from __future__ import annotations

from typing import Annotated

import typer

from fedit.cli.common import (
    ConfigOption,
    OverrideOption,
    QuietOption,
    console,
    friendly_errors,
    resolve_config,
)


@friendly_errors
def personalize(
    config: ConfigOption = None,
    set_: OverrideOption = None,
    steps: Annotated[
        int,
        typer.Option(
            "--steps",
            min=0,
            help="Fine-tuning steps from the global adapter (FedSA-LoRA: the client's own; "
            "0: score it as it is)",
        ),
    ] = 5,
    quiet: QuietOption = False,
) -> None:
    """Personalise: fine-tune the global adapter on each client's records (the run's config)."""
    cfg = resolve_config(config, set_)
    from fedit.experiments.personalize import PERSONALIZED_DIR, SCORES_FILE, personalize, report

    scores = personalize(cfg, steps, show_progress=not quiet)
    console.print(report(scores))
    console.print(
        f"adapters in {cfg.output_dir}/{PERSONALIZED_DIR}/client_<k>/, "
        f"scores in {cfg.output_dir}/{SCORES_FILE}"
    )
