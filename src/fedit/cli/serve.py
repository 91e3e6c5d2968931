"""`fedit serve`: a base model and the adapters of federated runs behind OpenAI's HTTP API,
with a chat page at "/"."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedit.cli.common import ConfigOption, OverrideOption, console, friendly_errors, resolve_config


@friendly_errors
def serve(
    config: ConfigOption = None,
    set_: OverrideOption = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            help="NAME=DIR or DIR: a round directory or a run directory (its last round); "
            "repeatable. The base model is always served as 'base'",
        ),
    ] = None,
    comparison: Annotated[
        Path | None,
        typer.Option("--comparison", help="Serve every trained model of a `fedit compare` dir"),
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="The most new tokens a request may ask")
    ] = 2048,
) -> None:
    """Serve models over an OpenAI-compatible API (/v1/chat/completions) and a chat page."""
    from fedit.serve.models import comparison_adapters, parse_adapter

    adapters = [parse_adapter(spec) for spec in adapter or []]
    if comparison is not None:
        adapters += comparison_adapters(comparison)
    first = adapters[0][1] if adapters else None
    saved = config is not None or (first is not None and (first / "config.toml").is_file())
    # Serving reads [model] only (each adapter's template comes from its own run), so with
    # no run config at all the data section just has to validate.
    overrides = [*([] if saved else ['data.path="synthetic"']), *(set_ or [])]
    cfg = resolve_config(config, overrides, first)

    import uvicorn

    from fedit.serve.api import create_app
    from fedit.serve.models import ModelPool

    # An explicit --config is the run of adapters that have no config.toml of their own;
    # the first adapter's config only names the base model (served_model).
    pool = ModelPool(cfg, adapters, cfg if config is not None else None)
    console.print(
        f"serving {', '.join(pool.models)} on http://{host}:{port}/ (chat page) and "
        f"http://{host}:{port}/v1 (OpenAI API)",
        markup=False,
    )
    uvicorn.run(create_app(pool, max_tokens), host=host, port=port, log_level="warning")
