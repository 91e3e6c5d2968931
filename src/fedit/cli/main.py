"""The `fedit` command: one subcommand per module of fedit.cli."""

from __future__ import annotations

import warnings

import typer
from transformers.utils import logging as hf_logging

from fedit.cli import compare, evaluate, export, generate, partition, tiny, train

# fedit draws its own progress bars; transformers' per-load bars and deprecation notices
# from inside PEFT/transformers would only bury them.
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")

app = typer.Typer(
    name="fedit",
    help="Federated instruction tuning of LLMs with LoRA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("train")(train.train)
app.command("partition")(partition.partition)
app.command("compare")(compare.compare)
app.command("eval")(evaluate.evaluate)
app.command("generate")(generate.generate)
app.command("export")(export.export)
app.command("tiny-model")(tiny.tiny_model)

if __name__ == "__main__":
    app()
