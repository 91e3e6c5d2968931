"""Options and error handling shared by the subcommands.

Only light modules are imported here and at the top of the command modules (torch,
transformers, PEFT and fedit.engine are imported inside the command functions), so that
`fedit --help` and `fedit <command> --help` answer at once.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from fedit.config import ConfigError, RunConfig, load_config
from fedit.data.partition import PartitionError
from fedit.data.records import DataFormatError
from fedit.errors import DeployError, RunStopped, as_os_error, describe
from fedit.models.inference import check_adapter_dir

console = Console(stderr=True)
USER_ERRORS = (
    ConfigError,
    DataFormatError,
    PartitionError,
    OSError,  # also FileNotFoundError / FileExistsError raised with a message of our own
    KeyError,
    RunStopped,
    DeployError,
)
F = TypeVar("F", bound=Callable[..., Any])

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="Run config (TOML), e.g. configs/*.toml")
]
OverrideOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a config value: section.key=value (repeatable; key= unsets)",
    ),
]
ResumeOption = Annotated[
    bool, typer.Option("--resume", help="Continue after the last completed round")
]
QuietOption = Annotated[bool, typer.Option("--quiet", help="No progress bars")]
AdapterOption = Annotated[
    Path | None,
    typer.Option("--adapter", help="A saved global adapter, e.g. runs/x/round_0010"),
]


def quiet_libraries() -> None:
    """fedit draws its own progress bars; transformers' per-load bars and deprecation
    notices from inside PEFT/transformers would only bury them. Called when a command
    runs, not at import, so that --help does not load transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def error_message(err: Exception) -> str:
    """One line for a user error; an OS error names its file (fedit.errors.describe)."""
    return describe(err) if isinstance(err, OSError) else str(err)


def friendly_errors(command: F, *, quiet: bool = True) -> F:
    """Run a subcommand with the libraries quietened; bad input (and a failed write) ends
    with one clear line naming the file, line or field, and exit code 2; no traceback.
    quiet=False for commands that load no model (quietening imports transformers)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if quiet:
            quiet_libraries()
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as err:
            _fail(error_message(err))
        except Exception as err:
            os_error = as_os_error(err)
            if os_error is None:
                raise
            _fail(error_message(os_error))

    return wrapper  # type: ignore[return-value]


def _fail(message: str) -> NoReturn:
    """Print `error: message` and exit with code 2."""
    # Plain text, unwrapped: paths and "[split]" must not be reflowed or read as markup.
    console.print(
        f"error: {message}", style="bold red", markup=False, highlight=False, soft_wrap=True
    )
    raise typer.Exit(code=2) from None


def resolve_config(
    config: Path | None, overrides: list[str] | None, adapter: Path | None = None
) -> RunConfig:
    """The run config: --config, else the one saved beside --adapter, else defaults.

    A given --adapter is checked first: a mistyped one is the error to report, not the
    config that was looked for beside it.
    """
    if adapter is not None:
        check_adapter_dir(adapter)
    if config is None and adapter is not None:
        saved = adapter / "config.toml"
        if saved.is_file():
            config = saved
    return load_config(config, overrides or [])
