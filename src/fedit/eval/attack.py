"""Attack success beside clean quality, for the data-level attacks (fedit.attacks.data).

Scored by greedy generation on the held-out prompts, the same path and batches as exact
match (fedit.eval.generate), and the same rule (fedit.eval.exact_match.normalize):
``attack_success`` (poison_responses) is the share of held-out prompts whose answer is
the attack's target; ``trigger_success`` (backdoor) the share of the same prompts with the
trigger prepended whose answer is the target. The clean score is the untriggered one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fedit.attacks.data import with_trigger
from fedit.config import DATA_ATTACKS, AttackConfig, RunConfig
from fedit.data.records import Record
from fedit.data.templates import stop_token_ids
from fedit.data.tokenize import tokenize_prompts
from fedit.eval.exact_match import exact_match, score_by_category
from fedit.eval.generate import generate_answers

Generate = Callable[[Sequence[Record]], list[str]]  # records -> greedy answers, in order


def record_generator(model: torch.nn.Module, tokenizer, cfg: RunConfig) -> Generate:
    """Greedy answers to records' prompts, rendered with the run's template and batched
    with eval.batch_size."""

    stops = stop_token_ids(cfg.data.template, tokenizer)

    def generate(records: Sequence[Record]) -> list[str]:
        prompts = tokenize_prompts(records, tokenizer, cfg.data.template, cfg.data.system_prompt)
        return generate_answers(
            model, tokenizer, prompts, stops, cfg.eval.max_new_tokens, cfg.eval.batch_size
        )

    return generate


def target_rate(answers: Sequence[str], target: str) -> float:
    """The share of ``answers`` that exact-match ``target``."""
    if not answers:
        raise ValueError("nothing to score: no answers")
    return sum(exact_match(a, target) for a in answers) / len(answers)


def attack_scores(
    attack: AttackConfig,
    records: Sequence[Record],
    generate: Generate,
    clean_answers: Sequence[str] | None = None,
) -> dict[str, float]:
    """{"attack_success"} (poison_responses) or {"trigger_success"} (backdoor) on the
    held-out ``records``, {} for other kinds. ``clean_answers``: the untriggered answers
    when already generated (poison_responses then generates nothing)."""
    if attack.kind == "poison_responses":
        answers = generate(records) if clean_answers is None else clean_answers
        return {"attack_success": target_rate(answers, attack.target)}
    if attack.kind == "backdoor":
        triggered = [with_trigger(r, attack.trigger) for r in records]
        return {"trigger_success": target_rate(generate(triggered), attack.target)}
    return {}


def final_attack_eval(
    cfg: RunConfig, tokenizer, records: Sequence[Record]
) -> Callable[[torch.nn.Module], dict[str, Any]] | None:
    """What a run's last round adds to its "attack" metrics under a data attack: the clean
    exact match (mean over categories) on ``records`` and the attack's success; None
    without a data attack or held-out records."""
    if cfg.attack.kind not in DATA_ATTACKS or not records:
        return None

    def evaluate(model: torch.nn.Module) -> dict[str, Any]:
        generate = record_generator(model, tokenizer, cfg)
        answers = generate(records)
        references = [r.response for r in records]
        categories = [r.category for r in records]
        clean = score_by_category(answers, references, categories)["mean"]
        return {"exact_match": clean, **attack_scores(cfg.attack, records, generate, answers)}

    return evaluate
