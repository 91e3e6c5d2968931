"""`fedit coordinate` and `fedit join`: one federation across machines (fedit.deploy).

The coordinator runs one command for a config; every data owner runs one command with its
own data file, the coordinator's CA certificate and its own node key. flwr and torch are
imported only when a command runs.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from fedit.cli.common import (
    ConfigOption,
    OverrideOption,
    QuietOption,
    ResumeOption,
    console,
    friendly_errors,
    resolve_config,
)

DEFAULT_STATE_DIR = Path.home() / ".cache" / "fedit" / "join"


def _stop_on_sigterm(stop: threading.Event | None = None) -> None:
    """SIGTERM ends the command as Ctrl-C does: its Flower children are stopped. The
    SystemExit can land in a finaliser, which swallows it (seen in `fedit join` while its
    model loaded), so `stop` is set first: the owner's task loop ends at its next poll."""

    def terminate(*_: object) -> None:
        if stop is not None:
            stop.set()
        sys.exit(143)

    signal.signal(signal.SIGTERM, terminate)


def _log_to_stderr() -> None:
    """fedit's own lines (rounds served, model loads) at INFO; libraries' warnings only."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("fedit").setLevel(logging.INFO)


@friendly_errors
def coordinate(
    config: ConfigOption = None,
    set_: OverrideOption = None,
    resume: ResumeOption = False,
    quiet: QuietOption = False,
) -> None:
    """Coordinate a federation across machines: [deploy] of the config names the owners."""
    cfg = resolve_config(config, set_)
    _stop_on_sigterm()
    _log_to_stderr()
    from fedit.deploy.coordinator import coordinate as run_coordinator

    run_coordinator(cfg, resume=resume, show_progress=not quiet)


@friendly_errors
def join(
    server: Annotated[str, typer.Option("--server", help="The coordinator's HOST:PORT")],
    data: Annotated[
        Path | None, typer.Option("--data", help="This owner's instruction records")
    ] = None,
    preference_data: Annotated[
        Path | None, typer.Option("--preference-data", help="This owner's preference pairs")
    ] = None,
    root_cert: Annotated[
        Path | None, typer.Option("--root-cert", help="The coordinator's ca.pem")
    ] = None,
    key: Annotated[
        Path | None, typer.Option("--key", help="This node's private key (fedit certs node-key)")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="The base model here, if not the run's path")
    ] = None,
    fields: Annotated[
        str, typer.Option("--fields", help="Field names of --data (as data.fields)")
    ] = "dolly",
    state_dir: Annotated[
        Path, typer.Option("--state-dir", help="Where per-client state is kept")
    ] = DEFAULT_STATE_DIR,
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads")] = None,
    activation_wait: Annotated[
        float, typer.Option("--activation-wait", help="Seconds to retry a refused activation")
    ] = 120.0,
    connect_wait: Annotated[
        float, typer.Option("--connect-wait", help="Seconds to wait for the coordinator")
    ] = 600.0,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS and no node key (development only)")
    ] = False,
    secure_only: Annotated[
        bool,
        typer.Option(
            "--secure-aggregation-only",
            help="Train only for runs with secagg.enabled (the coordinator sees sums only)",
        ),
    ] = False,
) -> None:
    """Join a federation as a data owner: your records never leave this machine."""
    from fedit.deploy.join import join_federation
    from fedit.deploy.owner import OwnerInputs

    if insecure:
        console.print(
            "warning: --insecure: the adapters cross the network in plaintext and the "
            "coordinator is not authenticated",
            style="bold red",
        )
    elif root_cert is None or key is None:
        raise typer.BadParameter("--root-cert and --key are required (or --insecure)")
    stop = threading.Event()
    _stop_on_sigterm(stop)
    _log_to_stderr()
    inputs = OwnerInputs(
        data, preference_data, model, state_dir, fields, threads=threads, secure_only=secure_only
    )
    join_federation(
        inputs, server, root_cert, key, insecure, activation_wait, connect_wait, stop=stop
    )
