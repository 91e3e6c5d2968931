"""`fedit certs`: the keys and certificates of a deployment (fedit.deploy.pki).

`fedit certs ca` is run once by the coordinator: ca.pem goes to every data owner, ca.key
stays offline, server.pem/server.key are the coordinator's TLS identity. `fedit certs
node-key` is run by each data owner: node.key never leaves the machine, node.pub goes to
the coordinator for deploy.clients. cryptography is imported only when a command runs.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from fedit.cli.common import console, friendly_errors

app = typer.Typer(
    help="Keys and certificates for a deployment across machines.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
# no model is loaded here: quietening transformers would only import it
plain_errors = functools.partial(friendly_errors, quiet=False)
ForceOption = Annotated[
    bool, typer.Option("--force", help="Replace existing files (the old keys stop working)")
]


@app.command("ca")
@plain_errors
def ca(
    out: Annotated[Path, typer.Option("--out", help="Directory for ca.pem, ca.key, server.*")],
    server_name: Annotated[
        str, typer.Option("--server-name", help="DNS name the data owners connect to")
    ],
    ip: Annotated[
        list[str] | None,
        typer.Option("--ip", help="An IP address the data owners connect to (repeatable)"),
    ] = None,
    force: ForceOption = False,
) -> None:
    """A CA and the coordinator's server certificate signed by it (EC P-384)."""
    from fedit.deploy.pki import make_ca  # cryptography only now

    written = make_ca(out, server_name, ip or [], force=force)
    _report(written, f"give {out / 'ca.pem'} to every data owner; keep {out / 'ca.key'} offline")


@app.command("node-key")
@plain_errors
def node_key(
    out: Annotated[
        Path, typer.Option("--out", help="The private key file, e.g. node.key (-> node.pub)")
    ],
    force: ForceOption = False,
) -> None:
    """A data owner's node key (EC P-384, OpenSSH format) and its public half."""
    from fedit.deploy.pki import make_node_key  # cryptography only now

    private, public = make_node_key(out, force=force)
    _report([private, public], f"send {public} to the coordinator; {private} stays here")


def _report(paths: list[Path], advice: str) -> None:
    """The files written (stdout, one per line), then what to do with them."""
    for path in paths:
        print(path)
    console.print(advice, markup=False, highlight=False, soft_wrap=True)
