"""Prompt templates and tokenisation: rendering, label masking, truncation and dropping."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from fedit.config import ConfigError, load_config
from fedit.data.records import Record
from fedit.data.templates import (
    ResponseFrame,
    render_conversation,
    render_prompt,
    response_frame,
    stop_token_ids,
)
from fedit.data.tokenize import IGNORE_INDEX, tokenize_prompt, tokenize_records
from fedit.models.tiny import byte_tokenizer
from tests.conftest import chatml_base_tokenizer, gemma_like_tokenizer, sentencepiece_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


def test_alpaca_without_input(tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = render_prompt(Record("Name a color.", "Red."), "alpaca", tokenizer)
    assert prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a color.\n\n### Response:\n"
    )


def test_alpaca_with_input(tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = render_prompt(Record("Sum {x}.", "3", context="1, 2"), "alpaca", tokenizer)
    assert prompt == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSum {x}.\n\n### Input:\n1, 2\n\n### Response:\n"
    )


def test_chat_uses_tokenizer_template(tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = render_prompt(Record("Hi", "Hello", context="ctx"), "chat", tokenizer)
    assert prompt == "<|im_start|>user\nHi\n\nctx<|im_end|>\n<|im_start|>assistant\n"


def test_chat_system_prompt_is_put_first(tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = render_prompt(Record("Hi", "Hello"), "chat", tokenizer, system_prompt="")
    assert prompt == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    (example,), _ = tokenize_records(
        [Record("Hi", "Hello")], tokenizer, "chat", max_seq_len=1024, system_prompt="Be brief."
    )
    assert tokenizer.decode(example.input_ids).startswith("<|im_start|>system\nBe brief.")


def test_system_prompt_needs_the_chat_template() -> None:
    with pytest.raises(ConfigError, match="data.system_prompt"):
        load_config(None, ["data.path=x.jsonl", 'data.system_prompt=""'])
    cfg = load_config(None, ["data.path=x.jsonl", "data.template=chat", 'data.system_prompt=""'])
    assert cfg.data.system_prompt == ""


def test_unknown_template(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="'vicuna'"):
        render_prompt(Record("a", "b"), "vicuna", tokenizer)


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_loss_on_response_and_eos_only(tokenizer: PreTrainedTokenizerFast, template: str) -> None:
    record = Record("Say hi", "hi there", category="greet")
    (example,), report = tokenize_records([record], tokenizer, template, max_seq_len=1024)
    prompt = tokenize_prompt(record, tokenizer, template)
    response = tokenizer("hi there", add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt + response + [tokenizer.eos_token_id]
    assert example.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert example.labels[len(prompt) :] == [*response, tokenizer.eos_token_id]
    assert example.category == "greet"
    assert (report.total, report.truncated, report.dropped) == (1, 0, 0)


def test_alpaca_adds_no_bos(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenize_prompt(Record("x", "y"), tokenizer, "alpaca")
    assert tokenizer.bos_token_id not in ids


def test_train_on_prompt_labels_everything(tokenizer: PreTrainedTokenizerFast) -> None:
    (example,), _ = tokenize_records(
        [Record("Say hi", "hi")], tokenizer, "chat", max_seq_len=1024, train_on_prompt=True
    )
    assert example.labels == example.input_ids


def test_truncation_counts_and_drops(tokenizer: PreTrainedTokenizerFast) -> None:
    prompt_len = len(tokenize_prompt(Record("q", "a"), tokenizer, "chat"))
    records = [
        Record("q", "a", category="fits"),  # prompt + 1 + eos
        Record("q", "abcdef", category="cut"),  # loses its tail, keeps some response
        Record("q" * 50, "a", category="dropped"),  # prompt alone fills max_seq_len
    ]
    examples, report = tokenize_records(records, tokenizer, "chat", max_seq_len=prompt_len + 3)
    assert [e.category for e in examples] == ["fits", "cut"]
    assert all(len(e.input_ids) <= prompt_len + 3 for e in examples)
    cut = examples[1]
    assert cut.labels[prompt_len:] == cut.input_ids[prompt_len:]  # still only response labels
    assert tokenizer.eos_token_id not in cut.input_ids[prompt_len:]
    assert (report.total, report.truncated, report.dropped) == (3, 2, 1)
    assert "1 dropped" in report.summary()


def test_batch_prompts_match_single(tokenizer: PreTrainedTokenizerFast) -> None:
    records = [Record(f"instruction {i}", f"response {i}", context="c" * i) for i in range(20)]
    examples, _ = tokenize_records(records, tokenizer, "alpaca", max_seq_len=4096)
    for record, example in zip(records, examples, strict=True):
        prompt = tokenize_prompt(record, tokenizer, "alpaca")
        assert example.input_ids[: len(prompt)] == prompt


def test_no_records(tokenizer: PreTrainedTokenizerFast) -> None:
    examples, report = tokenize_records([], tokenizer, "alpaca", max_seq_len=64)
    assert examples == [] and report.total == 0


def test_heldout_scores_response_tokens_even_when_training_on_prompts(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    from fedit.engine.federation_data import tokenize_heldout

    cfg = load_config(None, ["data.path=x.jsonl", "data.train_on_prompt=true"])
    record = Record("Name a color.", "Red.")
    (example,), _ = tokenize_heldout(cfg, tokenizer, [record])
    prompt = tokenize_prompt(record, tokenizer, "alpaca")
    assert example.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert example.labels[len(prompt) :] == example.input_ids[len(prompt) :]


def test_a_conversation_renders_as_its_training_records(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    """One user turn renders exactly as a training record; a longer chat keeps its turns
    and its own system turn; alpaca takes one user message only."""
    one = [{"role": "user", "content": "Add 2 and 3."}]
    record = Record(instruction="Add 2 and 3.", response="-")
    for template, system in (("chat", ""), ("chat", None), ("alpaca", None)):
        expected = render_prompt(record, template, tokenizer, system)
        assert render_conversation(one, template, tokenizer, system) == expected
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Add 2 and 3."},
    ]
    text = render_conversation(chat, "chat", tokenizer, "ignored: the chat has its own")
    assert "Be brief." in text and "Hello" in text and "ignored" not in text
    assert text.endswith(render_conversation(one, "chat", tokenizer).split("Add 2 and 3.")[-1])
    with pytest.raises(ValueError, match="alpaca template, which has one user turn"):
        render_conversation(chat, "alpaca", tokenizer)
    with pytest.raises(ValueError, match="the last message must be the user's"):
        render_conversation(chat[:3], "chat", tokenizer)


# ----------------------------------------------- end of turn and whole-text tokenisation


@pytest.mark.parametrize(
    ("make", "end_token"),
    [(chatml_base_tokenizer, "<|im_end|>"), (gemma_like_tokenizer, "<end_of_turn>")],
)
def test_chat_responses_end_with_the_templates_end_of_turn(make, end_token: str) -> None:
    tokenizer = make()
    end = tokenizer.convert_tokens_to_ids(end_token)
    assert end != tokenizer.eos_token_id
    (example,), _ = tokenize_records([Record("Hi", "Hello")], tokenizer, "chat", 1024)
    assert example.labels[-1] == end and example.input_ids[-1] == end
    assert tokenizer.eos_token_id not in example.input_ids
    (alpaca,), _ = tokenize_records([Record("Hi", "Hello")], tokenizer, "alpaca", 1024)
    assert alpaca.labels[-1] == tokenizer.eos_token_id  # no turns: eos ends a response


@pytest.mark.parametrize(
    ("make", "template"),
    [
        (sentencepiece_tokenizer, "alpaca"),
        (byte_tokenizer, "alpaca"),
        (byte_tokenizer, "chat"),
        (gemma_like_tokenizer, "chat"),
    ],
)
def test_response_tokens_are_those_of_the_whole_text(make, template: str) -> None:
    """prompt + response as the tokenizer splits the whole text (no spurious ▁ before the
    response), with the labels on the response and its end token."""
    tokenizer = make()
    record = Record("Name a color.", "Red is a color.")
    (example,), _ = tokenize_records([record], tokenizer, template, 1024)
    text = render_prompt(record, template, tokenizer) + record.response
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert example.input_ids[:-1] == whole
    prompt = tokenize_prompt(record, tokenizer, template)
    assert whole[: len(prompt)] == prompt
    assert example.labels == [IGNORE_INDEX] * len(prompt) + example.input_ids[len(prompt) :]


LLAMA2_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + m['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def test_response_frame_reads_the_templates_own_turn() -> None:
    """What the template writes around an assistant message, and the token ending it."""
    chatml = chatml_base_tokenizer()
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert response_frame("chat", chatml) == ResponseFrame("", "", im_end)
    assert stop_token_ids("chat", chatml) == [im_end, chatml.eos_token_id]
    assert response_frame("alpaca", chatml) == ResponseFrame("", "", chatml.eos_token_id)
    assert stop_token_ids("alpaca", chatml) == [chatml.eos_token_id]
    llama2 = sentencepiece_tokenizer()
    llama2.chat_template = LLAMA2_TEMPLATE
    assert response_frame("chat", llama2) == ResponseFrame(" ", " ", llama2.eos_token_id)
    llama2.chat_template = None  # a base model's: no turns, eos ends what it generates
    assert stop_token_ids("chat", llama2) == [llama2.eos_token_id]
