"""Prompt templates: the text a model sees before the response starts.

"alpaca" is the Stanford Alpaca prompt (a with-input variant when the record has context);
"chat" is the tokenizer's own chat template with one user turn and the assistant's
generation prompt, after a system turn when ``system_prompt`` is given (None: whatever the
template itself puts first, e.g. SmolLM2's default system prompt; "": an empty system turn,
which for SmolLM2 saves ~17 tokens on every record). A conversation record's prompt is
all its turns before the last reply, its own system turn winning over ``system_prompt``;
"alpaca" has no turns and refuses it. Training and generation both render
prompts here, so they always agree, and ``exported_chat_template`` writes the same rendering
as a chat template for plain transformers.

``response_frame`` says how a response is closed: for "chat", as the template itself closes
an assistant turn (ChatML's ``<|im_end|>``, Gemma's ``<end_of_turn>``, which differ from eos
on Qwen2.5 base and Gemma instruct); for "alpaca", with eos. Generation stops on that token.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedit.config import ConfigError
from fedit.data.conversations import chat_messages
from fedit.data.records import Record

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


NO_TURNS = (
    "'alpaca' has one prompt and one response, no turns: conversation records need 'chat' "
    "(the model's own chat template)"
)


def _alpaca(record: Record, tokenizer: PreTrainedTokenizerBase, system_prompt: str | None) -> str:
    if record.history:
        raise ValueError(f"data.template: {NO_TURNS}")
    if record.context.strip():
        return ALPACA_WITH_INPUT.format(instruction=record.instruction, input=record.context)
    return ALPACA_NO_INPUT.format(instruction=record.instruction)


def _chat(record: Record, tokenizer: PreTrainedTokenizerBase, system_prompt: str | None) -> str:
    messages = chat_messages(record, system_prompt)[:-1]  # every turn before the answer
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


TEMPLATES: dict[str, Callable[[Record, PreTrainedTokenizerBase, str | None], str]] = {
    "alpaca": _alpaca,
    "chat": _chat,
}


def render_prompt(
    record: Record,
    template: str,
    tokenizer: PreTrainedTokenizerBase,
    system_prompt: str | None = None,
) -> str:
    """The prompt text for `record`, ending exactly where the response begins.

    `system_prompt` applies to "chat" only (alpaca has no system turn).
    """
    try:
        render = TEMPLATES[template]
    except KeyError:
        raise ValueError(
            f"unknown prompt template {template!r} (known: {', '.join(TEMPLATES)})"
        ) from None
    return render(record, tokenizer, system_prompt)


def render_conversation(
    messages: list[dict[str, str]],
    template: str,
    tokenizer: PreTrainedTokenizerBase,
    system_prompt: str | None = None,
) -> str:
    """The prompt for the assistant's next turn of a conversation ({"role", "content"}
    dicts, the last one the user's), as `template` renders a training record: "chat" the
    whole conversation through the tokenizer's chat template (with `system_prompt` first
    unless the conversation has its own); "alpaca" has a single turn and no system turn, so
    a conversation of one user message only (ValueError otherwise)."""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("messages: the last message must be the user's")
    if template == "alpaca":
        if len(messages) != 1:
            raise ValueError(
                "messages: this model was trained with the alpaca template, which has one "
                "user turn and no system turn; send a single user message"
            )
        return render_prompt(Record(messages[0]["content"], ""), template, tokenizer)
    if template != "chat":
        raise ValueError(f"unknown prompt template {template!r} (known: {', '.join(TEMPLATES)})")
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# A response the template renders verbatim: where it appears shows what surrounds a turn.
_PROBE_QUESTION, _PROBE_ANSWER = "fedit-probe-question", "fedit-probe-answer"


@dataclass(frozen=True)
class ResponseFrame:
    """How a training response is written after its prompt: ``before`` + response +
    ``after`` as text, then the token ``end_id`` that ends the turn (trained, and where
    generation stops)."""

    before: str
    after: str
    end_id: int


def response_frame(template: str, tokenizer: PreTrainedTokenizerBase) -> ResponseFrame:
    """The frame of a response under `template` ("alpaca": eos only).

    For "chat", a one-turn conversation with a probe answer is rendered: the text between
    the generation prompt and the answer is ``before`` (Llama-2's " "), the text after it up
    to the template's first special token is ``after``, and that token is ``end_id``. A
    template that writes no special token after a turn ends it with eos.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; responses must end with one")
    if template != "chat":
        return ResponseFrame("", "", eos)
    if not tokenizer.chat_template:  # a base model's tokenizer (GPT-2, Pythia, most bases)
        raise ConfigError(
            f"data.template = 'chat': the tokenizer of {tokenizer.name_or_path} has no chat "
            "template; use data.template = 'alpaca', or a model that has one"
        )
    question = [{"role": "user", "content": _PROBE_QUESTION}]
    turn = [*question, {"role": "assistant", "content": _PROBE_ANSWER}]
    prompt = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    rendered = tokenizer.apply_chat_template(turn, tokenize=False)
    if not rendered.startswith(prompt) or _PROBE_ANSWER not in rendered[len(prompt) :]:
        raise ValueError(
            "data.template = 'chat': the tokenizer's chat template does not write an "
            "assistant turn after its generation prompt, so fedit cannot train on it"
        )
    before, after = rendered[len(prompt) :].split(_PROBE_ANSWER, 1)
    special = [(after.find(t), t) for t in _special_tokens(tokenizer) if t in after]
    if not special:
        return ResponseFrame(before, "", eos)
    position, token = min(special, key=lambda found: (found[0], -len(found[1])))
    return ResponseFrame(before, after[:position], tokenizer.convert_tokens_to_ids(token))


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    return [*tokenizer.all_special_tokens, *added]


def stop_token_ids(template: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Where generation stops: the end of a turn under `template`, and eos. A tokenizer
    without a chat template has no turns to end (`fedit serve`'s raw completions of such a
    base model), so eos only."""
    if template == "chat" and not tokenizer.chat_template:
        return [tokenizer.eos_token_id]
    end = response_frame(template, tokenizer).end_id
    return list(dict.fromkeys([end, tokenizer.eos_token_id]))


def exported_chat_template(
    tokenizer: PreTrainedTokenizerBase, template: str, system_prompt: str | None
) -> str | None:
    """A Jinja chat template with which `tokenizer.apply_chat_template(messages,
    add_generation_prompt=True)` renders what fedit trains and generates with
    (render_conversation): for "chat" the tokenizer's own, after `system_prompt` when the
    conversation has no system turn (an empty one too: that is what the run trained
    with, not the template's default); for "alpaca" the Alpaca prompt of one user message.
    """
    if template == "alpaca":
        before, after = ALPACA_NO_INPUT.split("{instruction}")
        return (
            "{% if messages | length != 1 or messages[0]['role'] != 'user' %}"
            "{{ raise_exception('this model was trained with the alpaca template: send a "
            "single user message') }}{% endif %}"
            f"{{{{ {_jinja_string(before)} + messages[0]['content'] + {_jinja_string(after)} }}}}"
        )
    own = tokenizer.chat_template
    if system_prompt is None or not isinstance(own, str):
        return own
    system = f"{{'role': 'system', 'content': {_jinja_string(system_prompt)}}}"
    return (
        f"{{% if messages[0]['role'] != 'system' %}}{{% set messages = [{system}] + messages %}}"
        f"{{% endif %}}{own}"
    )


def _jinja_string(text: str) -> str:
    """`text` as a Jinja string literal: Jinja reads JSON's escapes (\\n, \\", \\uXXXX)."""
    return json.dumps(text)
