"""A `fedit serve` app on a real uvicorn server bound to 127.0.0.1 (a free port), over the
tiny model with two adapters "a" and "b" that answer differently: for the API and the
browser tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import uvicorn

from fedit.config import load_config
from fedit.models.adapters import attach_lora, get_adapter_state, save_adapter, set_adapter_state
from fedit.models.loading import load_model
from fedit.models.tiny import make_tiny_model
from fedit.serve.api import create_app
from fedit.serve.models import ModelPool, parse_adapter
from tests.conftest import tiny_run_overrides

MAX_TOKENS_CAP = 64
CONTEXT = 4096


def random_adapter(model_dir: Path | str, out: Path, seed: int, scale: float = 1.0) -> Path:
    """A saved adapter with B ≠ 0 (entries N(0, scale²)), so it changes what the model says."""
    cfg = load_config(None, tiny_run_overrides(model_dir, out))  # type: ignore[arg-type]
    model = attach_lora(load_model(cfg.model), cfg.lora, seed)
    gen = torch.Generator().manual_seed(seed)
    state = {
        k: scale * torch.randn(v.shape, generator=gen) for k, v in get_adapter_state(model).items()
    }
    set_adapter_state(model, state)
    save_adapter(model, state, out / "round_0003")
    cfg.save(out / "round_0003" / "config.toml")  # as a run's rounds have it
    return out


@contextmanager
def serving(pool: ModelPool, cap: int = MAX_TOKENS_CAP) -> Iterator[str]:
    """`pool`'s app on a uvicorn server on 127.0.0.1 (a free port): its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    running = uvicorn.Server(uvicorn.Config(create_app(pool, cap), log_level="warning"))
    thread = threading.Thread(target=running.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not running.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        running.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("serve")
    # a longer context than the suite's tiny model: a judge's prompt is ~1,200 bytes
    tiny_model_dir = make_tiny_model(root / "model", context=CONTEXT)
    runs = [
        random_adapter(tiny_model_dir, root / name, seed) for name, seed in [("a", 1), ("b", 2)]
    ]
    cfg = load_config(None, tiny_run_overrides(tiny_model_dir, root / "unused"))
    with serving(ModelPool(cfg, [parse_adapter(str(run)) for run in runs])) as url:
        yield url
