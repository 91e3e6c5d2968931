"""Generation stops where training taught the model to stop: the template's end of turn.

A model tuned with a ChatML template whose eos is another token (Qwen2.5 base) ends its
answers with <|im_end|>; `fedit generate`, the evaluations and `fedit serve` must stop
there, not run on to eos or the token limit. A scripted model answers "hi", the end of
turn, then "xy": the answer is "hi" only when generation stops on the end of turn.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import torch

from fedit.data.templates import stop_token_ids
from fedit.eval.generate import generate_answers
from fedit.serve.generation import Generator, Outcome, Sampling
from fedit.serve.models import ServedModel
from tests.conftest import chatml_base_tokenizer


class ScriptedModel(torch.nn.Module):
    """Greedy generation that always continues with the same tokens, honouring the stop
    ids and the streamer as transformers' generate does."""

    def __init__(self, script: list[int]) -> None:
        super().__init__()
        self.script = script
        self.weight = torch.nn.Parameter(torch.zeros(1))  # a device to run on

    def generate(self, input_ids, max_new_tokens, eos_token_id, pad_token_id, **options):
        stops = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
        new = []
        for token in self.script[:max_new_tokens]:
            new.append(token)
            if token in stops:
                break
        out = torch.cat([input_ids, torch.tensor([new] * len(input_ids))], dim=1)
        if options.get("streamer") is not None:
            options["streamer"].put(input_ids.cpu())
            for token in out[0, input_ids.shape[1] :]:
                options["streamer"].put(token.view(1))
            options["streamer"].end()
        return out


def scripted(tokenizer) -> ScriptedModel:
    ids = tokenizer(["hi", "<|im_end|>", "xy"], add_special_tokens=False)["input_ids"]
    return ScriptedModel([token for part in ids for token in part])


def test_generate_answers_stop_at_the_end_of_turn() -> None:
    tokenizer = chatml_base_tokenizer()
    prompt = tokenizer("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    stops = stop_token_ids("chat", tokenizer)
    [answer] = generate_answers(scripted(tokenizer), tokenizer, [prompt], stops, 16)
    assert answer == "hi"


def test_serve_stops_at_the_end_of_turn_and_says_it_stopped() -> None:
    tokenizer = chatml_base_tokenizer()
    model = scripted(tokenizer)

    @contextmanager
    def active(name: str):
        yield model

    pool = SimpleNamespace(
        tokenizer=tokenizer,
        models={"base": ServedModel("base", None, "chat", None)},
        active=active,
    )
    outcome = Outcome(prompt_tokens=3)
    text = Generator(pool).complete(
        "base", [1, 2, 3], Sampling(max_tokens=8, temperature=0), outcome
    )
    assert text == "hi"
    assert (outcome.completion_tokens, outcome.finish_reason) == (3, "stop")
