"""`fedit tiny-model DIR`: write a tiny random Llama for smoke tests (no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedit.cli.common import friendly_errors


@friendly_errors
def tiny_model(
    directory: Annotated[Path, typer.Argument(help="Where to write the model")],
    hidden_size: Annotated[int, typer.Option(help="Hidden size")] = 64,
    layers: Annotated[int, typer.Option(help="Decoder layers")] = 2,
) -> None:
    """A random-initialised 2-layer Llama with a byte-level tokenizer."""
    from fedit.models.tiny import make_tiny_model  # torch & co. only now

    print(make_tiny_model(directory, hidden_size=hidden_size, num_layers=layers))
