"""`fedit generate`: greedy answers for one prompt or a file of prompts, with an adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from fedit.cli.common import (
    AdapterOption,
    ConfigOption,
    OverrideOption,
    console,
    friendly_errors,
    resolve_config,
)
from fedit.data.readers import read_records
from fedit.data.records import DataFormatError, Record
from fedit.textfile import NotUTF8Error, read_utf8


def _prompt_records(prompt: list[str] | None, prompts: Path | None, fields: str) -> list[Record]:
    records = [Record(instruction=p, response="-") for p in prompt or []]
    if prompts is not None:
        if prompts.suffix == ".txt":
            try:
                lines = read_utf8(prompts).splitlines()
            except NotUTF8Error as err:
                raise DataFormatError(str(err)) from None
            records += [Record(instruction=ln, response="-") for ln in lines if ln.strip()]
        else:
            records += read_records(str(prompts), fields)
    if not records:
        raise FileNotFoundError("give --prompt TEXT or --prompts FILE (.txt, .jsonl, .json, .csv)")
    return records


@friendly_errors
def generate(
    config: ConfigOption = None,
    set_: OverrideOption = None,
    adapter: AdapterOption = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="An instruction")] = None,
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="Instructions: .txt lines or a records file")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write answers as JSONL")] = None,
) -> None:
    """Answer instructions with the configured prompt template (greedy decoding)."""
    from fedit.data.templates import stop_token_ids
    from fedit.data.tokenize import tokenize_prompt
    from fedit.eval.generate import generate_answers
    from fedit.models.inference import load_for_inference

    cfg = resolve_config(config, set_, adapter)
    records = _prompt_records(prompt, prompts, cfg.data.fields)
    tokenizer, model = load_for_inference(cfg, adapter)
    prompt_ids = [
        tokenize_prompt(r, tokenizer, cfg.data.template, cfg.data.system_prompt) for r in records
    ]
    stops = stop_token_ids(cfg.data.template, tokenizer)
    answers = generate_answers(
        model, tokenizer, prompt_ids, stops, cfg.eval.max_new_tokens, cfg.eval.batch_size
    )
    lines = [
        {"instruction": r.instruction, "context": r.context, "answer": a}
        for r, a in zip(records, answers, strict=True)
    ]
    for line in lines:  # Text: user and model text are never read as rich markup
        console.print(
            Text(f"> {line['instruction']}", style="bold"), Text(f"{line['answer']}\n"), sep="\n"
        )
    if out:
        out.write_text("".join(json.dumps(line) + "\n" for line in lines))
        console.print(f"answers written to {out}", markup=False)
