"""Options and error handling shared by the subcommands."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from fedit.config import ConfigError, RunConfig, load_config
from fedit.data.partition import PartitionError
from fedit.data.records import DataFormatError
from fedit.server.validation import AllUpdatesRejectedError

console = Console(stderr=True)
USER_ERRORS = (
    ConfigError,
    DataFormatError,
    PartitionError,
    FileNotFoundError,
    FileExistsError,
    KeyError,
    AllUpdatesRejectedError,
)
F = TypeVar("F", bound=Callable[..., Any])

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="Run config (TOML), e.g. configs/*.toml")
]
OverrideOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: section.key=value (repeatable)"),
]
AdapterOption = Annotated[
    Path | None,
    typer.Option("--adapter", help="A saved global adapter, e.g. runs/x/round_0010"),
]


def friendly_errors(command: F) -> F:
    """Bad input ends with one clear line naming the file, line or field; no traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as err:
            # Plain text, unwrapped: paths and "[split]" must not be reflowed or read as markup.
            console.print(
                f"error: {err}", style="bold red", markup=False, highlight=False, soft_wrap=True
            )
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def resolve_config(
    config: Path | None, overrides: list[str] | None, adapter: Path | None = None
) -> RunConfig:
    """The run config: --config, else the one saved beside --adapter, else defaults."""
    if config is None and adapter is not None:
        saved = adapter / "config.toml"
        if saved.is_file():
            config = saved
    return load_config(config, overrides or [])
