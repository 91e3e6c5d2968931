"""The fleet-only front: the one address a coordinator exposes beyond loopback (§2.1).

Flower 1.42 serves the Fleet, Control and Runtime APIs on one HTTP(S) port
(F/superlink/main.py create_app includes all three routers; `--host`/`--port` are the only
bind options, the gRPC ones are gone), the Control API is unauthenticated without OIDC and
AcquireTask is open without a SuperExec secret (§1.6). So the SuperLink stays on
127.0.0.1 and this front, a uvicorn server in a thread of the coordinator process,
forwards `POST /v1/fleet/<endpoint>` to it and answers everything else 404. A SuperLink
that cannot be reached is a 502 (F/supercore/retry/http_retry.py: a SuperNode retries
502/503/504 and treats any other status as fatal); an upstream timeout is a 504.
Paths are matched whole (`/v1/fleet/` + letters and dashes), so no dot segment or
encoded slash can reach another API.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fedit.deploy.flower.processes import FederationError

FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z-]*")
# a Fleet request carries at most one 5 MiB array chunk (F/common/constant.py
# FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE) plus protobuf framing; anything far larger is refused
MAX_BODY = 32 * 1024 * 1024
# hop-by-hop headers, and encodings: httpx decodes the upstream body, so it is sent as is
DROP_REQUEST = {"host", "content-length", "transfer-encoding", "connection", "accept-encoding"}
DROP_RESPONSE = {"content-length", "transfer-encoding", "connection", "content-encoding"}
UPSTREAM_TIMEOUT = httpx.Timeout(120.0, connect=5.0)


async def _body(request: Request) -> bytes | None:
    """The request body, or None once it passes MAX_BODY."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def fleet_app(upstream: str, ca: Path | None) -> Starlette:
    """The front's ASGI app: forward Fleet POSTs to `upstream` ("127.0.0.1:PORT"),
    verifying its certificate against `ca` (None: the SuperLink runs --insecure)."""
    if ca is None:
        client = httpx.AsyncClient(base_url=f"http://{upstream}", timeout=UPSTREAM_TIMEOUT)
    else:
        verify = ssl.create_default_context(cafile=str(ca))
        client = httpx.AsyncClient(
            base_url=f"https://{upstream}", verify=verify, timeout=UPSTREAM_TIMEOUT
        )

    async def forward(request: Request) -> Response:
        if request.method != "POST" or not FLEET_PATH.fullmatch(request.url.path):
            return Response(status_code=404)
        body = await _body(request)
        if body is None:
            return Response(status_code=413)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROP_REQUEST}
        try:
            answer = await client.post(request.url.path, content=body, headers=headers)
        except httpx.TimeoutException:
            return Response(status_code=504)
        except httpx.TransportError:
            return Response(status_code=502)
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in DROP_RESPONSE}
        return Response(answer.content, status_code=answer.status_code, headers=kept)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


class FleetFront:
    """The front on `host`:`port` (TLS with `cert`/`key` unless both are None), in a
    daemon thread. The socket is bound in `start`, so a port in use fails there, and
    port 0 picks a free one (`port` holds the bound port after `start`)."""

    def __init__(
        self,
        host: str,
        port: int,
        upstream: str,
        ca: Path | None,
        cert: Path | None,
        key: Path | None,
    ) -> None:
        self.host, self.port, self.upstream = host, port, upstream
        self.ca, self.cert, self.key = ca, cert, key
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as err:
            sock.close()
            raise FederationError(
                f"fleet front: cannot listen on {self.host}:{self.port}: {err.strerror}"
            ) from None
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            fleet_app(self.upstream, self.ca),
            ssl_certfile=str(self.cert) if self.cert else None,
            ssl_keyfile=str(self.key) if self.key else None,
            log_level="warning",
            access_log=False,
            lifespan="on",
            ws="none",  # plain HTTP POSTs only
        )
        server = self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=lambda: asyncio.run(server.serve(sockets=[sock])),
            name="fleet-front",
            daemon=True,
        )
        self._thread.start()
        self._wait_started(timeout)

    def _wait_started(self, timeout: float) -> None:
        assert self._server is not None and self._thread is not None
        self._thread.join(0.05)
        waited = 0.05
        while not self._server.started and self._thread.is_alive() and waited < timeout:
            self._thread.join(0.05)
            waited += 0.05
        if not self._server.started:
            self.stop()
            raise FederationError(f"fleet front on {self.host}:{self.port} did not start")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10.0)

    def __enter__(self) -> FleetFront:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
