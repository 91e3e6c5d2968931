"""Instruction records: the unit of data every client holds."""

from __future__ import annotations

from dataclasses import dataclass


class DataFormatError(ValueError):
    """A data file or record is malformed; the message names the file, line and field."""


@dataclass(frozen=True)
class Record:
    """One instruction-tuning example (Dolly's fields; Alpaca's map onto them).

    A conversation (fedit.data.conversations) keeps all its turns, as (role, content) pairs
    ending with the assistant's, in ``messages``; its ``instruction`` and ``response`` are
    its last user and assistant turns, so held-out scoring and generation read it as the
    question it ends with, asked after the earlier turns.
    """

    instruction: str
    response: str
    context: str = ""
    category: str = "default"
    messages: tuple[tuple[str, str], ...] = ()  # () for a single-turn record
