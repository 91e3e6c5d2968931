"""The `fedit` command: one subcommand per module of fedit.cli.

Importing this module loads no torch, transformers or PEFT (the commands import them when
they run), so `fedit --help` and `fedit <command> --help` answer at once.
"""

from __future__ import annotations

import typer

from fedit.cli import (
    certs,
    compare,
    config,
    data,
    deploy,
    evaluate,
    export,
    generate,
    judge,
    partition,
    personalize,
    report,
    serve,
    simulate,
    tiny,
    train,
)

app = typer.Typer(
    name="fedit",
    help="Federated instruction tuning of LLMs with LoRA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: typer's rich help panel prints a type beside every option, flags
    # included ("--resume <bool>"), though a flag takes no value.
    rich_markup_mode=None,
)
app.command("train")(train.train)
app.command("partition")(partition.partition)
app.add_typer(data.app, name="data")
app.command("config")(config.config)
app.command("compare")(compare.compare)
app.command("personalize")(personalize.personalize)
app.command("eval")(evaluate.evaluate)
app.command("generate")(generate.generate)
app.command("export")(export.export)
app.command("serve")(serve.serve)
app.command("judge")(judge.judge)
app.command("report")(report.report)
app.command("tiny-model")(tiny.tiny_model)
app.add_typer(certs.app, name="certs")
app.command("coordinate")(deploy.coordinate)
app.command("join")(deploy.join)
app.command("simulate-ray")(simulate.simulate_ray)

if __name__ == "__main__":
    app()
