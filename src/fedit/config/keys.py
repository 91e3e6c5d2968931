"""Every config key with its type, default and help, for `fedit config`.

Name, type and default come from the section dataclasses themselves. The help is the
field's comment in the source: the comment lines directly above the field plus any comment
on the field's own lines. Those comments are the one place each key is explained next to
its code (docs/configuration.md's table is written for readers of the docs and does not
ship with the package), so `fedit config` never says something the code does not;
tests/unit/test_config_keys.py requires a comment on every key.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
from dataclasses import dataclass
from typing import Any, get_type_hints

from fedit.config.run import RunConfig
from fedit.config.toml_write import toml_value


@dataclass(frozen=True)
class KeyInfo:
    """One config key as `--set key=value` names it."""

    key: str  # section.name, or name at the top level
    type: str  # e.g. "int", "str | None", "list[str]"
    default: str  # in TOML syntax; "unset" for an optional key without a value
    help: str


def config_keys() -> list[KeyInfo]:
    """Every key of RunConfig, top-level keys first, then each section in TOML order."""
    keys = _section_keys(RunConfig, "")
    for section in dataclasses.fields(RunConfig):
        kind = get_type_hints(RunConfig)[section.name]
        if dataclasses.is_dataclass(kind):
            keys += _section_keys(kind, f"{section.name}.")
    return keys


def _section_keys(cls: type, prefix: str) -> list[KeyInfo]:
    hints = get_type_hints(cls)
    comments = field_comments(cls)
    keys = []
    for item in dataclasses.fields(cls):
        kind = hints[item.name]
        if dataclasses.is_dataclass(kind):
            continue  # a section: its keys are listed under its own name
        keys.append(
            KeyInfo(
                f"{prefix}{item.name}",
                kind.__name__ if isinstance(kind, type) else str(kind),
                _default(item),
                comments.get(item.name, ""),
            )
        )
    return keys


def _default(item: dataclasses.Field) -> str:
    if item.default is not dataclasses.MISSING:
        value: Any = item.default
    else:
        value = item.default_factory()  # type: ignore[misc]
    return "unset" if value is None else toml_value(value)


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment text in `cls`'s source: the comment lines directly above it,
    then those on its own lines (a default may span several), joined into one line."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    found = {}
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = []
        line = node.lineno - 1
        while line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        inline = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        found[node.target.id] = " ".join(text for text in above + inline if text)
    return found
