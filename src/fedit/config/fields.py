"""What every field check shares: the error that names the field, and the check itself."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""


def require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{where}: {message}")
