"""Instruction records: the unit of data every client holds."""

from __future__ import annotations

from dataclasses import dataclass


class DataFormatError(ValueError):
    """A data file or record is malformed; the message names the file, line and field."""


@dataclass(frozen=True)
class Record:
    """One instruction-tuning example (Dolly's fields; Alpaca's map onto them).

    A conversation (fedit.data.conversations) is its last exchange, ``instruction`` and
    ``response``, after its earlier turns, ``history`` ((role, content) pairs, its system
    turn first if it has one). Everything that reads or changes a record's question or
    answer (held-out scoring, generation, the data attacks) so sees a conversation's last
    one, asked after the earlier turns.
    """

    instruction: str
    response: str
    context: str = ""
    category: str = "default"
    history: tuple[tuple[str, str], ...] = ()  # () for a single-turn record
