"""`fedit data`: look at a run's data as training sees it.

    fedit data preview -c configs/dolly.toml --records 3
    fedit data preview -c configs/dolly.toml --client 4 | less

`preview` loads the run's tokenizer (no model) and prepares the data with the very
functions a run uses (fedit.engine.federation_data.prepare_data): records are read, held
out, partitioned and tokenised once. It prints records as the model sees them, the
loss-carrying tokens between ⟦ and ⟧ (and highlighted on a terminal), then the clients ×
categories table of `fedit partition`. Any tokenised record shows this way, whatever format
it was read from: the marks come from its labels. A preference pair shows as two rows, the
prompt followed by the chosen and by the rejected response, the response marked (the
tokens whose log-probabilities DPO compares).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from fedit.cli.common import ConfigOption, OverrideOption, friendly_errors, resolve_config
from fedit.cli.partition import rich_table
from fedit.config import ConfigError, RunConfig
from fedit.data.partition import category_table, format_table
from fedit.data.prepare import prepare_preferences, prepare_records
from fedit.data.tokenize import IGNORE_INDEX

app = typer.Typer(
    help="Look at a run's data as training sees it.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
LOSS_OPEN, LOSS_CLOSE = "⟦", "⟧"  # around loss-carrying text; survives a pipe and no colour
LOSS_STYLE = "bold green"


@app.command("preview")
@friendly_errors
def preview(
    config: ConfigOption = None,
    set_: OverrideOption = None,
    records: Annotated[
        int, typer.Option("--records", min=0, help="Records (and preference pairs) to show")
    ] = 3,
    client: Annotated[
        int | None,
        typer.Option("--client", min=0, help="Show this client's records only (federated mode)"),
    ] = None,
) -> None:
    """A few training records (and preference pairs) rendered as the model sees them,
    loss-carrying tokens marked ⟦like this⟧, then the items per client and category."""
    from fedit.engine.federation_data import prepare_data  # torch only now
    from fedit.models.loading import load_tokenizer

    cfg = resolve_config(config, set_)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg, tokenizer)
    console = Console(soft_wrap=True, highlight=False)
    if cfg.data.path:
        _preview_records(console, cfg, tokenizer, data, client, records)
    if cfg.data.preference_path:
        _preview_pairs(console, cfg, tokenizer, data, client, records)


def _preview_records(console: Console, cfg: RunConfig, tokenizer, data, client, limit) -> None:
    chosen = _clients_to_show(cfg, len(data.clients), client)
    for name, example in _first_items(cfg, data.clients, chosen, limit, "record"):
        _show(console, cfg, tokenizer, name, example.input_ids, example.labels)
    prepared = prepare_records(cfg)  # the partition `fedit partition` prints
    _print_table(console, category_table(prepared.train, prepared.parts))
    console.print(data.report.summary(), markup=False)


def _preview_pairs(console: Console, cfg: RunConfig, tokenizer, data, client, limit) -> None:
    chosen = _clients_to_show(cfg, len(data.pair_clients), client)
    for name, pair in _first_items(cfg, data.pair_clients, chosen, limit, "pair"):
        for side, response in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            # as collate_pairs scores it: the response's tokens after the prompt
            ids, labels = pair.prompt_ids + response, [IGNORE_INDEX] * len(pair.prompt_ids)
            _show(console, cfg, tokenizer, f"{name}, {side}", ids, labels + response)
    pairs = prepare_preferences(cfg)  # the same split, as pairs
    title = "Preference pairs per client and category"
    _print_table(console, category_table(pairs.train, pairs.parts), title)
    console.print(data.pair_report.summary(), markup=False)


def _print_table(
    console: Console,
    table: tuple[list[str], list[list[int]]],
    title: str = "Records per client and category",
) -> None:
    """`fedit partition`'s table: drawn on a terminal; in a pipe, the plain text it writes to
    partition_table.txt, whose columns are never cut to 80 characters."""
    if console.is_terminal:
        console.print(rich_table(*table, title=title))
    else:
        console.print(title, markup=False)
        console.print(format_table(*table), markup=False)


def _clients_to_show(cfg: RunConfig, count: int, client: int | None) -> list[int]:
    if client is None:
        return list(range(count))
    if cfg.federation.mode != "federated":
        raise ConfigError(f"--client: federation.mode = {cfg.federation.mode!r} trains one client")
    if client >= count:
        raise ConfigError(f"--client {client}: the run has clients 0..{count - 1}")
    return [client]


def _first_items(
    cfg: RunConfig, per_client: Sequence[Sequence], clients: list[int], limit: int, what: str
) -> Iterator[tuple[str, Any]]:
    """Up to `limit` (name, item) pairs, taking each client's next item in turn."""
    shown, depth = 0, 0
    while shown < limit and any(depth < len(per_client[k]) for k in clients):
        for k in clients:
            if shown < limit and depth < len(per_client[k]):
                yield f"{_client_name(cfg, k)}, {what} {depth}", per_client[k][depth]
                shown += 1
        depth += 1


def _client_name(cfg: RunConfig, index: int) -> str:
    mode = cfg.federation.mode
    if mode == "centralized":
        return "pooled client"
    return f"client {cfg.federation.local_client if mode == 'local' else index}"


def _show(
    console: Console, cfg: RunConfig, tokenizer, name: str, ids: list[int], labels: list[int]
):
    console.print(_header(cfg, name, ids, labels), markup=False)
    console.print(marked_text(tokenizer, ids, labels))
    console.print()


def _header(cfg: RunConfig, name: str, input_ids: list[int], labels: list[int]) -> str:
    trained = sum(label != IGNORE_INDEX for label in labels)
    text = f"── {name}: {len(input_ids)} tokens, {trained} with loss"
    if len(input_ids) >= cfg.data.max_seq_len:
        text += f"; fills data.max_seq_len = {cfg.data.max_seq_len} (a longer record is cut here)"
    return text


def loss_segments(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The decoded text in runs of tokens that do or do not carry loss: (text, has_loss).

    Each run is the difference of two prefix decodings, so a tokenizer that joins pieces
    (SentencePiece's ▁, byte-level BPE) renders the text as it reads whole; where a prefix
    decoding is not a prefix of the next (a run boundary inside a multi-byte character),
    the run is decoded alone.
    """

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    segments: list[tuple[str, bool]] = []
    start, before = 0, ""
    for end in range(1, len(input_ids) + 1):
        has_loss = labels[start] != IGNORE_INDEX
        if end < len(input_ids) and (labels[end] != IGNORE_INDEX) == has_loss:
            continue
        upto = decode(input_ids[:end])
        text = upto[len(before) :] if upto.startswith(before) else decode(input_ids[start:end])
        segments.append((text, has_loss))
        start, before = end, upto
    return segments


def marked_text(tokenizer, input_ids: list[int], labels: list[int]) -> Text:
    """The record's text with each loss-carrying run between ⟦ ⟧, styled for a terminal."""
    text = Text()
    for piece, has_loss in loss_segments(tokenizer, input_ids, labels):
        if has_loss:
            text.append(f"{LOSS_OPEN}{piece}{LOSS_CLOSE}", style=LOSS_STYLE)
        else:
            text.append(piece)
    return text
