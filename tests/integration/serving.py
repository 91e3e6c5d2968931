"""A `fedit serve` app on a real uvicorn server bound to 127.0.0.1 (a free port), over the
tiny model with two adapters "a" and "b" that answer differently: for the API and the
browser tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import uvicorn

from fedit.config import load_config
from fedit.models.adapters import attach_lora, get_adapter_state, save_adapter, set_adapter_state
from fedit.models.loading import load_model
from fedit.serve.api import create_app
from fedit.serve.models import ModelPool, parse_adapter
from tests.conftest import tiny_run_overrides

MAX_TOKENS_CAP = 64


def random_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A saved adapter with B ≠ 0, so that it changes what the model says."""
    cfg = load_config(None, tiny_run_overrides(model_dir, out))
    model = attach_lora(load_model(cfg.model), cfg.lora, seed)
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in get_adapter_state(model).items()}
    set_adapter_state(model, state)
    save_adapter(model, state, out / "round_0003")
    return out


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("serve")
    runs = [
        random_adapter(tiny_model_dir, root / name, seed) for name, seed in [("a", 1), ("b", 2)]
    ]
    cfg = load_config(None, tiny_run_overrides(tiny_model_dir, root / "unused"))
    pool = ModelPool(cfg, [parse_adapter(str(run)) for run in runs])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(pool, max_tokens_cap=MAX_TOKENS_CAP), log_level="warning")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not running.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    running.should_exit = True
    thread.join(timeout=30)
