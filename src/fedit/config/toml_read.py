"""Reading a run config from TOML: a file or text, plus ``--set section.key=value``
overrides, each value checked against its field's type before the config is validated."""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from fedit.config.data import clients_from_files
from fedit.config.fields import ConfigError, require
from fedit.config.run import RunConfig
from fedit.textfile import NotUTF8Error, read_utf8


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a TOML value against a dataclass field's annotation (the few types we use)."""
    args = get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    core = next((a for a in args if a is not type(None)), annotation)
    if value is None:  # an empty override value: `--set train.max_steps=`
        require(type(None) in args, where, "must not be empty (only optional keys can be unset)")
        return None
    if get_origin(core) is list:
        item = get_args(core)[0]  # str, int or float
        if isinstance(value, str) and item is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        kinds = int | float if item is float else item
        names = {str: "strings", int: "integers", float: "numbers"}
        require(
            isinstance(value, list)
            and all(isinstance(v, kinds) and not isinstance(v, bool) for v in value),
            where,
            f"expected a list of {names[item]}, got {value!r}",
        )
        if item is float:
            for v in value:
                require(math.isfinite(v), where, f"must be finite numbers, got {v!r}")
            return [float(v) for v in value]
        return value
    if core is float:
        require(
            isinstance(value, int | float) and not isinstance(value, bool),
            where,
            f"expected a number, got {value!r}",
        )
        require(math.isfinite(value), where, f"must be a finite number, got {value!r}")
        return float(value)
    expected = {bool: "true/false", int: "an integer", str: "a string"}[core]
    ok = isinstance(value, core) and (core is bool or not isinstance(value, bool))
    require(ok, where, f"expected {expected}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in known:
            raise ConfigError(f"{path}: unknown key (known: {', '.join(sorted(known))})")
        hint = hints[key]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            require(isinstance(value, dict), path, "expected a table")
            kwargs[key] = _build(hint, value, path)
        else:
            kwargs[key] = _coerce(value, hint, path)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.learning_rate=1e-3' -> (['train', 'learning_rate'], 0.001), values in TOML syntax.

    A value that is not valid TOML is taken as a bare string, so `data.path=a.jsonl` works.
    An empty value is None: it unsets an optional key (`train.max_steps=`).
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    if not raw.strip():
        return key.strip().split("."), None
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML config (or start from defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(read_utf8(path))
        except FileNotFoundError as err:
            raise ConfigError(f"{path}: config file not found") from err
        except IsADirectoryError as err:
            raise ConfigError(f"{path}: is a directory, not a config file (TOML)") from err
        except NotUTF8Error as err:
            raise ConfigError(str(err)) from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from err
    return _config_from(data, source, overrides)


def config_from_toml(text: str, source: str, overrides: list[str] | None = None) -> RunConfig:
    """``load_config`` for TOML text that did not come from a file (a deployment's task
    carries the run config); `source` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML: {err}") from err
    return _config_from(data, source, overrides)


def build_config(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """The RunConfig of TOML `data` with `overrides` applied: each value's type checked,
    nothing validated yet (RunConfig.validate does that)."""
    _override(data, overrides)
    return _build(RunConfig, data, "")


def _config_from(data: dict[str, Any], source: str, overrides: list[str] | None) -> RunConfig:
    _override(data, overrides)
    try:
        cfg = build_config(data)
        if "num_clients" not in data.get("partition", {}):  # typed, it must match the files
            clients_from_files(cfg.data, cfg.partition)
        return cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _override(data: dict[str, Any], overrides: list[str] | None) -> None:
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {key} is not a table")
        node[keys[-1]] = value
