"""Reading UTF-8 text files so that a bad byte is reported by file, line and column.

Python's own decoder reports a byte offset into a buffer (``position 88``) from deep inside
a traceback; config files and data files both go through ``read_utf8`` instead, which
names the line and column a person can open the file at.
"""

from __future__ import annotations

import re
from pathlib import Path

_NEWLINE = re.compile(r"\r\n|\r|\n")  # universal newlines, as text-mode files count lines


class NotUTF8Error(ValueError):
    """A file is not valid UTF-8; the message names the file, line, column and byte."""


def read_utf8(path: str | Path) -> str:
    """The file's text, newlines untranslated (callers split lines as their format needs)."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        lines = _NEWLINE.split(raw[: err.start].decode("utf-8"))
        raise NotUTF8Error(
            f"{path}:{len(lines)}: not valid UTF-8 "
            f"(byte 0x{raw[err.start]:02x} at column {len(lines[-1]) + 1})"
        ) from None
