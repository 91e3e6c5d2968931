"""The `fedit` command: one subcommand per module of fedit.cli."""

from __future__ import annotations

import typer

from fedit.cli import evaluate, export, generate, partition, tiny, train

app = typer.Typer(
    name="fedit",
    help="Federated instruction tuning of LLMs with LoRA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("train")(train.train)
app.command("partition")(partition.partition)
app.command("eval")(evaluate.evaluate)
app.command("generate")(generate.generate)
app.command("export")(export.export)
app.command("tiny-model")(tiny.tiny_model)

if __name__ == "__main__":
    app()
