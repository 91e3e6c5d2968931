"""Instruction records: the unit of data every client holds."""

from __future__ import annotations

from dataclasses import dataclass


class DataFormatError(ValueError):
    """A data file or record is malformed; the message names the file, line and field."""


@dataclass(frozen=True)
class Record:
    """One instruction-tuning example (Dolly's fields; Alpaca's map onto them)."""

    instruction: str
    response: str
    context: str = ""
    category: str = "default"
