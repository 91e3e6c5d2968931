"""`fedit config`: every config key, or the resolved config a run would train with.

    fedit config                                  # every key: type, default and help
    fedit config | grep data.                     # one line per key
    fedit config -c configs/dolly.toml --set federation.rounds=3   # the TOML `train` runs
    fedit config --run runs/dolly                 # the config saved in a run directory

Nothing here imports torch: a config is read and checked without the parts it names.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from fedit.cli.common import ConfigOption, OverrideOption, friendly_errors, resolve_config
from fedit.config import ConfigError, to_toml
from fedit.config.keys import config_keys
from fedit.textfile import read_utf8

# no model is loaded here: quietening transformers would only import it
plain_errors = functools.partial(friendly_errors, quiet=False)


@plain_errors
def config(
    config: ConfigOption = None,
    set_: OverrideOption = None,
    run: Annotated[
        Path | None,
        typer.Option("--run", help="A run directory: print the config.toml saved in it"),
    ] = None,
    keys: Annotated[
        bool, typer.Option("--keys", help="Every key with its type, default and help (the default)")
    ] = False,
) -> None:
    """Every config key with its type, default and help; or, with -c/--set, the resolved and
    validated config as TOML (what `fedit train` would run); or a run's saved config."""
    chosen = [name for name, given in (("-c/--set", config or set_), ("--run", run)) if given]
    if keys:
        chosen.insert(0, "--keys")
    if len(chosen) > 1:
        raise typer.BadParameter(f"give one of {', '.join(chosen)}")
    if run is not None:
        print(_saved_config(run), end="")
    elif config is not None or set_:
        print(to_toml(resolve_config(config, set_).to_dict()), end="")
    else:
        for key in config_keys():
            print(f"{key.key}: {key.type} = {key.default}  # {key.help}")


def _saved_config(run: Path) -> str:
    saved = run / "config.toml"
    if not saved.is_file():
        raise ConfigError(f"--run {run}: no config.toml there (not a run directory)")
    return read_utf8(saved)
