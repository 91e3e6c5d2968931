"""Conversation records: OpenAI-style ``messages`` and ShareGPT ``conversations``.

    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}

A conversation is an optional system turn, then user and assistant turns in alternation,
ending with an assistant turn; ``conversation_record`` reads one into a ``Record``: the
last exchange as its instruction and response, the turns before it as its ``history``
(ShareGPT's human/gpt become user/assistant, so both layouts give the same record). A
conversation of one exchange and no system turn is a single-turn record. Anything else is
refused with one line naming the file, line and turn field, e.g.
``chat.jsonl:3: field 'messages[2].role': unknown role 'bot'``. A conversation has no
category unless the record gives one (``category``); it is then "conversation", so
partitioners and the held-out split see one category.
"""

from __future__ import annotations

from typing import Any

from fedit.data.records import DataFormatError, Record

# format name -> (the record's key holding the turns, a turn's role key, its text key)
FORMATS: dict[str, tuple[str, str, str]] = {
    "messages": ("messages", "role", "content"),
    "sharegpt": ("conversations", "from", "value"),
}
# ShareGPT's speaker names (and the OpenAI names some ShareGPT exports use) -> roles
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
ROLES = {"messages": {r: r for r in ("system", "user", "assistant")}, "sharegpt": SHAREGPT_ROLES}
DEFAULT_CATEGORY = "conversation"


def conversation_format(row: Any) -> str | None:
    """ "messages" or "sharegpt" when `row` holds its turns under that format's key."""
    if isinstance(row, dict):
        for name, (key, _, _) in FORMATS.items():
            if isinstance(row.get(key), list):
                return name
    return None


def conversation_record(row: Any, fmt: str, where: str) -> Record:
    """Validate one conversation row of format `fmt` and read it; `where` prefixes errors."""
    key, role_key, text_key = FORMATS[fmt]
    if not isinstance(row, dict):
        raise DataFormatError(f"{where}: expected an object, got {type(row).__name__}")
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataFormatError(
            f"{where}: field {key!r}: missing or empty (the file's first record is a {fmt} "
            "conversation, so every record must be)"
        )
    messages = tuple(
        _turn(turn, f"{key}[{n}]", role_key, text_key, ROLES[fmt], where)
        for n, turn in enumerate(turns)
    )
    _check_order([role for role, _ in messages], key, where)
    category = row.get("category")
    if not isinstance(category, str) or not category.strip():
        category = DEFAULT_CATEGORY
    (_, question), (_, answer) = messages[-2:]  # _check_order: the user's, the assistant's
    return Record(question, answer, "", category, messages[:-2])


def _turn(
    turn: Any, field: str, role_key: str, text_key: str, roles: dict[str, str], where: str
) -> tuple[str, str]:
    if not isinstance(turn, dict):
        raise DataFormatError(f"{where}: field {field!r}: expected an object per turn")
    role = turn.get(role_key)
    if role not in roles:
        raise DataFormatError(
            f"{where}: field '{field}.{role_key}': unknown role {role!r} "
            f"(known: {', '.join(roles)})"
        )
    content = turn.get(text_key)
    if not isinstance(content, str):
        raise DataFormatError(f"{where}: field '{field}.{text_key}': expected a string")
    if not content.strip():
        raise DataFormatError(f"{where}: field '{field}.{text_key}': empty")
    return roles[role], content


def _check_order(roles: list[str], key: str, where: str) -> None:
    """A system turn first or none, then user/assistant alternating, the assistant's last:
    the shape every chat template renders (several raise on anything else)."""
    first = 1 if roles[0] == "system" else 0
    for n, role in enumerate(roles[first:], start=first):
        expected = "user" if (n - first) % 2 == 0 else "assistant"
        if role != expected:
            where_system = " (a system turn may only come first)" if role == "system" else ""
            raise DataFormatError(
                f"{where}: field '{key}[{n}]': a {role} turn where the {expected}'s is "
                f"expected{where_system}; turns alternate user, assistant"
            )
    if "assistant" not in roles:
        raise DataFormatError(f"{where}: field {key!r}: no assistant turn to train on")
    if roles[-1] != "assistant":
        raise DataFormatError(
            f"{where}: field '{key}[{len(roles) - 1}]': the last turn is the user's; a "
            "conversation ends with the assistant's reply"
        )


def chat_messages(record: Record, system_prompt: str | None) -> list[dict[str, str]]:
    """`record` as chat-template messages: its history, the question (with its context)
    and the answer, after a `system_prompt` turn unless the record has its own system turn
    (the record's wins)."""
    question = record.instruction
    if record.context.strip():
        question += "\n\n" + record.context
    turns = [*record.history, ("user", question), ("assistant", record.response)]
    messages = [{"role": role, "content": content} for role, content in turns]
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages
