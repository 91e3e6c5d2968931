"""`fedit export`: merge a global adapter into the base weights (W0 + s·BA) and save.

With exact LoRA aggregation the round's base_residual.safetensors is folded in too
(W0 + R + s·BA), so the written model is the trained one and plain transformers loads it.
The tokenizer's chat template is rewritten to render the run's prompt (its template and
system prompt), so `apply_chat_template` asks the model as fedit trained it, and its
generation config stops at the end of a turn as `fedit generate` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedit.cli.common import (
    AdapterOption,
    ConfigOption,
    OverrideOption,
    console,
    friendly_errors,
    resolve_config,
)


@friendly_errors
def export(
    out: Annotated[Path, typer.Option("--out", help="Directory for the standalone model")],
    adapter: AdapterOption = None,
    config: ConfigOption = None,
    set_: OverrideOption = None,
) -> None:
    """Write a standalone Hugging Face model with the adapter merged in."""
    if adapter is None:
        raise FileNotFoundError("--adapter is required: the round directory to merge")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out}: is a file, not a directory; choose a new directory")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out}: is not empty; choose a new directory")
    cfg = resolve_config(config, set_, adapter)
    from fedit.data.templates import exported_chat_template, stop_token_ids
    from fedit.models.inference import load_for_inference  # torch & co. only now

    tokenizer, model = load_for_inference(cfg, adapter)
    # Plain transformers users prompt with apply_chat_template: make it the run's prompt.
    tokenizer.chat_template = exported_chat_template(
        tokenizer, cfg.data.template, cfg.data.system_prompt
    )
    merged = model.merge_and_unload()
    # ... and make generate() stop where the run's template ends a turn (Qwen2.5 base's
    # <|im_end|>, not its eos <|endoftext|>), as fedit generate and serve do.
    merged.generation_config.eos_token_id = stop_token_ids(cfg.data.template, tokenizer)
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    console.print(f"merged model written to {out}", markup=False)
