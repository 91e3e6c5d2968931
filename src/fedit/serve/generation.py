"""One request's generation, whole or streamed, for `fedit serve`.

Requests are served one at a time: the adapter switch is the shared model's state, and on
a CPU two generations at once only slow each other down. A streamed generation runs in
its own thread feeding transformers' TextIteratorStreamer; a client that goes away stops
it at the next token. Stop sequences end the text before them, as OpenAI's API does, and a
streamed reply holds back only the characters that could still begin one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from fedit.data.templates import stop_token_ids
from fedit.serve.models import ModelPool


@dataclass(frozen=True)
class Sampling:
    """What a request asks of the generation (validated by fedit.serve.api)."""

    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Outcome:
    """How a generation ended: its finish reason and token counts (OpenAI's usage)."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str = "stop"  # "stop" (end of turn or a stop sequence) | "length"
    error: BaseException | None = field(default=None, repr=False)


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """(text before the first stop sequence, whether one occurred)."""
    cuts = [i for s in stop if (i := text.find(s)) >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def held_back(text: str, stop: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could be the start of a stop sequence."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-n:]):
                longest = n
                break
    return longest


class Generator:
    """Generates for the pool's models, one request at a time."""

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool
        self.lock = threading.Lock()

    def complete(self, name: str, prompt: list[int], sampling: Sampling, outcome: Outcome) -> str:
        """The whole reply; `outcome` is filled in."""
        return "".join(self.stream(name, prompt, sampling, outcome))

    def stream(
        self, name: str, prompt: list[int], sampling: Sampling, outcome: Outcome
    ) -> Iterator[str]:
        """The reply's text as it is generated; `outcome` is filled in at the end."""
        tokenizer = self.pool.tokenizer
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancelled = threading.Event()
        worker = threading.Thread(
            target=self._generate,
            args=(name, prompt, sampling, streamer, cancelled, outcome),
            daemon=True,
        )
        worker.start()
        text, sent, stopped = "", 0, False
        try:
            for piece in streamer:
                text += piece
                kept, stopped = cut_at_stop(text, sampling.stop)
                ready = len(kept) if stopped else len(kept) - held_back(kept, sampling.stop)
                if ready > sent:
                    yield kept[sent:ready]
                    sent = ready
                if stopped:
                    break
            else:
                if len(text) > sent:
                    yield text[sent:]
        finally:
            cancelled.set()  # the consumer stopped reading, or the text hit a stop sequence
            worker.join()
        if outcome.error is not None:
            raise outcome.error
        if stopped:  # not "length", even when the stop sequence came with the last token
            outcome.finish_reason = "stop"

    def _generate(self, name, prompt, sampling, streamer, cancelled, outcome) -> None:
        tokenizer = self.pool.tokenizer
        try:
            # the end of turn its training taught (fedit.data.templates), and eos
            stops = stop_token_ids(self.pool.models[name].template, tokenizer)
            with self.lock, self.pool.active(name) as model, torch.no_grad():
                device = next(model.parameters()).device
                ids = torch.tensor([prompt], dtype=torch.long, device=device)
                options: dict = {"do_sample": sampling.temperature > 0}
                if sampling.temperature > 0:
                    options |= {"temperature": sampling.temperature, "top_p": sampling.top_p}
                    if sampling.seed is not None:
                        torch.manual_seed(sampling.seed)
                output = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=sampling.max_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=stops,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Cancelled(cancelled)]),
                    **options,
                )
            new = output[0, len(prompt) :]
            outcome.completion_tokens = int(new.numel())
            ended = bool(torch.isin(new, torch.tensor(stops, device=new.device)).any())
            if outcome.completion_tokens >= sampling.max_tokens and not ended:
                outcome.finish_reason = "length"
        except BaseException as err:  # re-raised in the request's thread
            outcome.error = err
            streamer.end()
