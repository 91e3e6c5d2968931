"""`fedit serve`'s HTTP API: OpenAI's /v1/models, /v1/chat/completions and /v1/completions
(whole and streamed), so any OpenAI client library can talk to a federated model.

Requests are validated before any generation: an unknown field, a value out of range or a
model this server does not have is a 4xx in OpenAI's error format
({"error": {"message", "type", "param", "code"}}), the message naming the field. A prompt
longer than the model's context, or a max_tokens past it, is refused the same way.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from fedit.data.templates import render_conversation
from fedit.serve.generation import Generator, Outcome, Sampling
from fedit.serve.models import ModelPool

DEFAULT_MAX_TOKENS = 256  # when a request names none, as far as the context allows
MAX_STOP = 4  # OpenAI's limit on stop sequences


class APIError(Exception):
    """A request refused with an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or ("model_not_found" if status == 404 else "invalid_request")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class GenerationRequest(Strict):
    """The fields both endpoints share (OpenAI's names and ranges)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: Literal[1] = 1  # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(GenerationRequest):
    prompt: str


def create_app(pool: ModelPool, max_tokens_cap: int = 2048) -> FastAPI:
    """The server's app over the models of `pool`; no request may ask for more than
    `max_tokens_cap` new tokens."""
    app = FastAPI(title="fedit serve", version="1")
    generator = Generator(pool)
    started = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return error_response(err.status, err.message, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            return error_response(400, "request body: not valid JSON", None, "invalid_json")
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        message = f"{where}: {first['msg']}" if where else first["msg"]
        return error_response(400, message, where or None, "invalid_request")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail), None, f"http_{err.status_code}")

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        return error_response(500, f"generation failed: {str(err)[:500]}", None, "server_error")

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(n, started) for n in pool.models]}

    @app.get("/v1/models/{name}")
    def get_model(name: str) -> dict[str, Any]:
        known(pool, name)
        return model_card(name, started)

    @app.post("/v1/chat/completions", response_model=None)
    def chat(body: ChatRequest) -> dict[str, Any] | StreamingResponse:
        served = known(pool, body.model)
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        try:
            text = render_conversation(
                messages, served.template, pool.tokenizer, served.system_prompt
            )
        except ValueError as err:
            raise APIError(400, str(err), "messages") from None
        prompt = pool.tokenizer(text, add_special_tokens=False)["input_ids"]
        return respond(body, prompt, "chat.completion")

    @app.post("/v1/completions", response_model=None)
    def completions(body: CompletionRequest) -> dict[str, Any] | StreamingResponse:
        known(pool, body.model)
        prompt = pool.tokenizer(body.prompt, add_special_tokens=False)["input_ids"]
        if not prompt:
            raise APIError(400, "prompt: must not be empty", "prompt")
        return respond(body, prompt, "text_completion")

    def respond(
        body: GenerationRequest, prompt: list[int], kind: str
    ) -> dict[str, Any] | StreamingResponse:
        """The reply of kind `kind` to a checked request, whole or as server-sent events."""
        sampling = sampling_of(body, len(prompt), pool.context, max_tokens_cap)
        reply = Reply(kind, body.model, len(prompt))
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            pieces = generator.stream(body.model, prompt, sampling, reply.outcome)
            return event_stream(reply.chunks(pieces, usage))
        return reply.whole(generator.complete(body.model, prompt, sampling, reply.outcome))

    page = resources.files("fedit.serve").joinpath("chat.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    def chat_page() -> str:
        return page

    return app


def error_response(status: int, message: str, param: str | None, code: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "fedit"}


def known(pool: ModelPool, name: str):
    if name not in pool.models:
        served = ", ".join(pool.models)
        raise APIError(404, f"model: {name!r} is not served here (served: {served})", "model")
    return pool.models[name]


def sampling_of(
    body: GenerationRequest, prompt_tokens: int, context: int | None, cap: int
) -> Sampling:
    """The request's sampling, its token budget checked against the context and the cap."""
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise APIError(400, f"stop: at most {MAX_STOP} non-empty sequences", "stop")
    room = cap if context is None else min(cap, context - prompt_tokens)
    if room < 1:
        raise APIError(
            400,
            f"the prompt is {prompt_tokens} tokens; the model's context is {context}",
            "messages",
            "context_length_exceeded",
        )
    asked = body.max_completion_tokens or body.max_tokens
    if asked is not None and asked > room:
        raise APIError(
            400,
            f"max_tokens: {asked} is more than the {room} new tokens this prompt of "
            f"{prompt_tokens} tokens leaves (context {context}, server cap {cap})",
            "max_tokens",
        )
    return Sampling(
        max_tokens=asked or min(DEFAULT_MAX_TOKENS, room),
        temperature=body.temperature,
        top_p=body.top_p,
        stop=tuple(stops),
        seed=body.seed,
    )


class Reply:
    """One response's envelope: its id, model, and usage once the generation ended."""

    def __init__(self, kind: str, model: str, prompt_tokens: int) -> None:
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        self.id, self.kind, self.model = f"{prefix}-{uuid.uuid4().hex}", kind, model
        self.created = int(time.time())
        self.outcome = Outcome(prompt_tokens)

    def usage(self) -> dict[str, int]:
        o = self.outcome
        total = o.prompt_tokens + o.completion_tokens
        return {
            "prompt_tokens": o.prompt_tokens,
            "completion_tokens": o.completion_tokens,
            "total_tokens": total,
        }

    def _envelope(self, kind: str, choices: list[dict]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _choice(self, kind: str, text: str, finish_reason: str | None, first: bool = False) -> dict:
        """One choice of `kind`: a chat message, a chat chunk's delta, a completion's text."""
        if kind == "text_completion":
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if kind == "chat.completion":
            message = {"role": "assistant", "content": text}
            return {"index": 0, "message": message, "finish_reason": finish_reason}
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": 0, "delta": delta if text or first else {}, "finish_reason": finish_reason}

    def whole(self, text: str) -> dict[str, Any]:
        choice = self._choice(self.kind, text, self.outcome.finish_reason)
        return {**self._envelope(self.kind, [choice]), "usage": self.usage()}

    def chunks(self, pieces: Iterator[str], usage: bool) -> Iterator[dict]:
        """The streamed reply: for chat a first chunk naming the role, then one chunk per
        piece of text, a last one with the finish reason, and the usage when asked."""
        kind = "chat.completion.chunk" if self.kind == "chat.completion" else self.kind
        if kind != self.kind:
            yield self._envelope(kind, [self._choice(kind, "", None, first=True)])
        for piece in pieces:
            yield self._envelope(kind, [self._choice(kind, piece, None)])
        yield self._envelope(kind, [self._choice(kind, "", self.outcome.finish_reason)])
        if usage:
            yield {**self._envelope(kind, []), "usage": self.usage()}


def event_stream(chunks: Iterator[dict]) -> StreamingResponse:
    """Server-sent events as OpenAI streams them, ending with "data: [DONE]". An error once
    the stream has begun can only be an event: it is sent as one, in the error format."""

    def events() -> Iterator[str]:
        try:
            for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except Exception as err:  # the status line is gone: report in the stream
            body = {"error": {"message": str(err)[:500], "type": "server_error"}}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
