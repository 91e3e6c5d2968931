"""`fedit serve` on the tiny model: a real uvicorn server on 127.0.0.1 answering OpenAI's
protocol to the official `openai` client (whole and streamed), switching adapters by model
name without a reload, and refusing bad requests with 4xx errors that name the field."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from fedit.config import ConfigError, load_config
from fedit.serve.models import ModelPool, parse_adapter
from tests.conftest import FEDIT, tiny_run_overrides
from tests.integration.serving import random_adapter


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(url: str, model: str, **options) -> str:
    reply = client(url).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Add 2 and 3."}],
        max_tokens=8,
        temperature=0,
        **options,
    )
    return reply.choices[0].message.content or ""


def test_the_openai_client_lists_the_models_and_chats(server: str) -> None:
    openai_client = client(server)
    assert sorted(m.id for m in openai_client.models.list()) == ["a", "b", "base"]
    assert openai_client.models.retrieve("a").owned_by == "fedit"
    reply = openai_client.chat.completions.create(
        model="a",
        messages=[{"role": "user", "content": "Add 2 and 3."}],
        max_tokens=8,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert ask(server, "a") == choice.message.content  # greedy: the same answer again


def test_adapters_switch_by_model_name(server: str) -> None:
    answers = {name: ask(server, name) for name in ("a", "b", "base")}
    assert len(set(answers.values())) == 3, answers  # three models, three answers
    assert ask(server, "a") == answers["a"]  # and back: nothing was left switched


def test_streaming_sends_the_same_text_in_chunks(server: str) -> None:
    whole = ask(server, "b")
    stream = client(server).chat.completions.create(
        model="b",
        messages=[{"role": "user", "content": "Add 2 and 3."}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and set(finishes[:-1]) == {None}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_completions_and_stop_sequences(server: str) -> None:
    openai_client = client(server)
    full = openai_client.completions.create(
        model="a", prompt="Once upon a time", max_tokens=12, temperature=0
    )
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and text
    stop = text.strip()[:2]  # a sequence the greedy answer is known to contain
    cut = openai_client.completions.create(
        model="a", prompt="Once upon a time", max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = openai_client.completions.create(
        model="a",
        prompt="Once upon a time",
        max_tokens=12,
        temperature=0,
        stop=[stop],
        stream=True,
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


@pytest.mark.parametrize(
    "body, status, message",
    [
        (
            {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
            404,
            "model: 'nope' is not served here (served: base, a, b)",
        ),
        ({"model": "a", "messages": []}, 400, "messages: List should have at least 1 item"),
        (
            {"model": "a", "messages": [{"role": "robot", "content": "hi"}]},
            400,
            "messages.0.role: Input should be 'system', 'user' or 'assistant'",
        ),
        (
            {"model": "a", "messages": [{"role": "user", "content": "hi"}], "temperature": 3},
            400,
            "temperature: Input should be less than or equal to 2",
        ),
        (
            {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 65},
            400,
            "max_tokens: 65 is more than the",
        ),
        (
            {"model": "a", "messages": [{"role": "user", "content": "hi"}], "n": 2},
            400,
            "n: Input should be 1",
        ),
        (
            {"model": "a", "messages": [{"role": "user", "content": "hi"}], "tools": []},
            400,
            "tools: Extra inputs are not permitted",
        ),
        (
            {"model": "a", "messages": [{"role": "assistant", "content": "hi"}]},
            400,
            "messages: the last message must be the user's",
        ),
        (
            {"model": "a", "messages": [{"role": "user", "content": "word " * 5000}]},
            400,
            "the prompt is",
        ),
    ],
)
def test_bad_requests_get_4xx_errors_that_name_the_field(
    server: str, body: dict, status: int, message: str
) -> None:
    reply = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"].startswith(message), error
    assert error["type"] == "invalid_request_error"


def test_the_openai_client_raises_on_an_unknown_model(server: str) -> None:
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        ask(server, "missing")
    assert httpx.get(f"{server}/v1/nothing", timeout=10).status_code == 404
    wrong = httpx.get(f"{server}/v1/chat/completions", timeout=10)
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "http_405"
    broken = httpx.post(
        f"{server}/v1/chat/completions",
        content=b"{not json",
        timeout=10,
        headers={"Content-Type": "application/json"},
    )
    assert broken.status_code == 400
    assert broken.json()["error"]["message"] == "request body: not valid JSON"
    assert httpx.get(f"{server}/v1/models/missing", timeout=10).status_code == 404


def test_the_pool_refuses_what_it_cannot_serve(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no round_NNNN directory"):
        parse_adapter(str(tmp_path))
    run = random_adapter(tiny_model_dir, tmp_path / "run", 3)
    with pytest.raises(ConfigError, match="must be 1-64 letters"):
        parse_adapter(f"base={run}")
    assert parse_adapter(f"mine={run}") == ("mine", run / "round_0003")
    cfg = load_config(None, tiny_run_overrides(tiny_model_dir, tmp_path / "x"))
    with pytest.raises(ConfigError, match="adapter names must differ"):
        ModelPool(cfg, [("x", run / "round_0003"), ("x", run / "round_0003")])
    (run / "round_0003" / "base_residual.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="exact-aggregation round"):
        ModelPool(cfg, [("x", run / "round_0003")])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fedit_serve_starts_from_the_command_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`fedit serve` as a user runs it: on 127.0.0.1, the run named after its directory."""
    run = random_adapter(tiny_model_dir, tmp_path / "mine", 4)
    port = free_port()
    command = [
        *FEDIT,
        "serve",
        "--set",
        f'model.name_or_path="{tiny_model_dir}"',
        "--adapter",
        str(run),
        "--port",
        str(port),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.communicate()[0].decode()
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "fedit serve did not answer"
                time.sleep(0.2)
        assert [m["id"] for m in models["data"]] == ["base", "mine"]
        assert ask(f"http://127.0.0.1:{port}", "mine")
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)


def test_each_adapter_is_served_in_its_own_run_s_prompt_format(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """An adapter's template and system prompt are those of the run that trained it (the
    config.toml beside it, which `fedit personalize` writes too), whatever the order of the
    adapters; one whose run is unknown is refused by name, not given another's format."""
    chat = random_adapter(tiny_model_dir, tmp_path / "chat", 1) / "round_0003"
    alpaca = random_adapter(tiny_model_dir, tmp_path / "alpaca", 2) / "round_0003"
    overrides = tiny_run_overrides(tiny_model_dir, tmp_path / "x")
    load_config(None, [*overrides, "data.template=chat", 'data.system_prompt=""']).save(
        chat / "config.toml"
    )
    load_config(None, overrides).save(alpaca / "config.toml")
    for cfg_path, adapters in [
        (chat, [("c", chat), ("a", alpaca)]),
        (alpaca, [("a", alpaca), ("c", chat)]),
    ]:
        pool = ModelPool(load_config(cfg_path / "config.toml"), adapters)
        assert (pool.models["c"].template, pool.models["c"].system_prompt) == ("chat", "")
        assert (pool.models["a"].template, pool.models["a"].system_prompt) == ("alpaca", None)
    (alpaca / "config.toml").unlink()  # e.g. what `fedit personalize` wrote before
    with pytest.raises(ConfigError, match=f"--adapter a={alpaca}: no config.toml"):
        ModelPool(load_config(chat / "config.toml"), [("c", chat), ("a", alpaca)])
