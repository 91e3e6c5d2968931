"""`fedit data preview`: records rendered as the model sees them, loss-carrying tokens
between ⟦ ⟧ exactly where the tokenised record's labels are, and the partition table."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer
from typer.testing import CliRunner

from fedit.cli.data import LOSS_CLOSE, LOSS_OPEN, LOSS_STYLE, loss_segments, marked_text
from fedit.cli.main import app
from fedit.config import load_config
from fedit.data.tokenize import IGNORE_INDEX
from fedit.engine.federation_data import prepare_data
from tests.conftest import sentencepiece_tokenizer

runner = CliRunner()


def preview_sets(model_dir: Path) -> list[str]:
    values = {
        "model.name_or_path": str(model_dir),
        "data.path": "synthetic",
        "data.synthetic_per_skill": 6,
        "data.heldout_per_category": 1,
        "data.max_seq_len": 384,
        "partition.num_clients": 3,
    }
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of loss-carrying positions."""
    spans, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_segments_mark_every_labelled_run_and_join_to_the_whole_text() -> None:
    """Two assistant turns (as a conversation has), on a SentencePiece tokenizer whose
    pieces decoded alone would lose their spaces."""
    tokenizer = sentencepiece_tokenizer()
    ids = tokenizer("Name a color.\nRed is a color.\nBlue, too.", add_special_tokens=False)[
        "input_ids"
    ]
    first, second = (3, 7), (len(ids) - 3, len(ids))
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in (first, second):
        labels[start:end] = ids[start:end]
    segments = loss_segments(tokenizer, ids, labels)
    decode = tokenizer.decode
    assert "".join(text for text, _ in segments) == decode(ids)
    assert [has for _, has in segments] == [False, True, False, True]
    marked = [text for text, has in segments if has]
    # a marked run is its tokens' text, the space that joins it to the one before included
    assert [m.strip() for m in marked] == [decode(ids[a:b]).strip() for a, b in (first, second)]


def test_on_a_terminal_the_marked_runs_are_also_styled() -> None:
    tokenizer = sentencepiece_tokenizer()
    ids = tokenizer("Red is a color.", add_special_tokens=False)["input_ids"]
    labels = [IGNORE_INDEX] * 2 + ids[2:]
    text = marked_text(tokenizer, ids, labels)
    styled = [text.plain[span.start : span.end] for span in text.spans if span.style == LOSS_STYLE]
    assert styled == [
        LOSS_OPEN + decode(tokenizer, ids)[len(decode(tokenizer, ids[:2])) :] + LOSS_CLOSE
    ]


def test_preview_marks_exactly_the_label_tokens(tiny_model_dir: Path) -> None:
    sets = preview_sets(tiny_model_dir)
    done = runner.invoke(app, ["data", "preview", *sets, "--records", "1"])
    assert done.exit_code == 0, done.output
    cfg = load_config(None, [s for s in sets if s != "--set"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    example = prepare_data(cfg, tokenizer).clients[0][0]
    ids, labels = example.input_ids, example.labels
    trained = sum(label != IGNORE_INDEX for label in labels)
    assert f"client 0, record 0: {len(ids)} tokens, {trained} with loss" in done.output
    (start, end), *more = runs(labels)
    assert not more  # an alpaca record: loss on the response and its end token only
    expected = decode(tokenizer, ids[:start]) + LOSS_OPEN + decode(tokenizer, ids[start:end])
    assert expected + LOSS_CLOSE in done.output
    assert done.output.count(LOSS_OPEN) == done.output.count(LOSS_CLOSE) == 1
    assert "Records per client and category" in done.output  # the partition's table
    # in a pipe, its plain text: no category name cut to fit 80 columns
    assert "name_age_json" in done.output.split("Records per client and category")[1]


def test_a_preference_pair_shows_both_responses_marked(tiny_model_dir: Path) -> None:
    sets = [*preview_sets(tiny_model_dir), "--set", "data.preference_path=synthetic"]
    sets += ["--set", "train.objective=dpo", "--set", "dpo.max_prompt_len=300"]
    done = runner.invoke(app, ["data", "preview", *sets, "--records", "1"])
    assert done.exit_code == 0, done.output
    cfg = load_config(None, [s for s in sets if s != "--set"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pair = prepare_data(cfg, tokenizer).pair_clients[0][0]
    prompt = decode(tokenizer, pair.prompt_ids)
    for side, response in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
        length = len(pair.prompt_ids) + len(response)
        assert (
            f"client 0, pair 0, {side}: {length} tokens, {len(response)} with loss" in done.output
        )
        marked = prompt + LOSS_OPEN + decode(tokenizer, response) + LOSS_CLOSE
        assert marked in done.output
    assert "Preference pairs per client and category" in done.output


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_client_picks_one_clients_records(tiny_model_dir: Path) -> None:
    sets = preview_sets(tiny_model_dir)
    done = runner.invoke(app, ["data", "preview", *sets, "--client", "2", "--records", "3"])
    assert done.exit_code == 0, done.output
    headers = [line for line in done.output.splitlines() if line.startswith("── ")]
    assert [h.split(":")[0] for h in headers] == [f"── client 2, record {i}" for i in range(3)]
    beyond = runner.invoke(app, ["data", "preview", *sets, "--client", "3"])
    assert beyond.exit_code == 2
    assert beyond.output.strip() == "error: --client 3: the run has clients 0..2"


def test_text_that_looks_like_markup_is_shown_as_it_is(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    row = {"instruction": "Say [bold]hi[/bold].", "context": "", "response": "[red]hi"}
    rows = [{**row, "category": "[c]"}, {**row, "category": "[c]"}]
    (tmp_path / "markup.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sets = [*preview_sets(tiny_model_dir), "--set", f"data.path={tmp_path / 'markup.jsonl'}"]
    sets += ["--set", "partition.num_clients=1", "--set", "data.heldout_per_category=0"]
    done = runner.invoke(app, ["data", "preview", *sets, "--records", "1"])
    assert done.exit_code == 0, done.output
    assert "Say [bold]hi[/bold]." in done.output
    assert f"{LOSS_OPEN}[red]hi" in done.output
    assert "[c]" in done.output  # the category's column


def test_a_bad_config_is_one_line_and_exit_2(tiny_model_dir: Path) -> None:
    sets = [*preview_sets(tiny_model_dir), "--set", "data.max_seq_len=2"]
    done = runner.invoke(app, ["data", "preview", *sets])
    assert done.exit_code == 2
    assert done.output.strip().splitlines() == [
        "error: defaults: data.max_seq_len: must be at least 8"
    ]
