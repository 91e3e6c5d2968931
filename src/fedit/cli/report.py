"""`fedit report`: a run's or a comparison's report.md with charts, from its metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedit.cli.common import console, friendly_errors


@friendly_errors
def report(
    directory: Annotated[Path, typer.Argument(help="A run directory or a `fedit compare` one")],
) -> None:
    """Write report.md (held-out loss, train loss, participation, bytes, final scores)."""
    from fedit.eval.run_report import write_report

    console.print(f"report: {write_report(directory)}", markup=False)
