"""RoundLoop against a fake ClientRunner: what a deployment's replies do to a round.

The runner here answers with hand-made updates (y_k = x + k + 1 in every coordinate) and
drops or rejects the clients a test names, so the loop's own rules are what is checked:
dropped clients are listed and left out, too few valid replies stop the run before any
state changes, and the aggregate is the mean over those that answered.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedit.config import load_config
from fedit.engine.checkpoint import completed_rounds
from fedit.engine.rounds import RoundLoop, TooFewRepliesError
from fedit.engine.runner import RoundPlan, RoundReplies
from fedit.models.adapters import attach_lora, get_adapter_state
from fedit.models.loading import load_model
from fedit.types import AdapterState, ClientUpdate, Rejection
from tests.conftest import tiny_run_overrides


class FakeRunner:
    """Clients in `drop` never answer; clients in `spoil` send a NaN adapter."""

    def __init__(self, drop: set[int], spoil: set[int] = frozenset()) -> None:
        self.drop, self.spoil = drop, spoil
        self.starts: list[AdapterState] = []  # the global adapter each round started from

    def run_round(self, plan: RoundPlan, global_state: AdapterState) -> RoundReplies:
        self.starts.append(global_state)
        replies = RoundReplies(updates=[])
        for task in reversed(plan.tasks):  # out of order, as replies arrive over a network
            k = task.client_id
            if k in self.drop:
                replies.dropped.append(Rejection(k, "timeout"))
                continue
            shift = float("nan") if k in self.spoil else k + 1.0
            state = {name: t + shift for name, t in global_state.items()}
            replies.updates.append(
                ClientUpdate(
                    k,
                    state,
                    num_examples=1,
                    num_steps=plan.train_cfg.max_steps,  # what the round's validation expects
                    learning_rate=plan.learning_rate,
                    metrics={"train_loss": 1.0},
                )
            )
            replies.traffic[k] = {"bytes_down": 10, "bytes_up": 20 + k}
        return replies


def loop_for(tiny_model_dir: Path, out: Path, runner: FakeRunner, min_replies: int):
    cfg = load_config(
        None,
        tiny_run_overrides(
            tiny_model_dir,
            out,
            **{"federation.clients_per_round": 3, "federation.rounds": 2, "lora.dropout": 0.0},
        ),
    )
    model = attach_lora(load_model(cfg.model), cfg.lora, cfg.seed)
    loop = RoundLoop(
        cfg,
        model,
        runner,
        num_clients=5,
        train_cfgs={"sft": cfg.train, "dpo": cfg.train},
        base_originals={},
        min_replies=min_replies,
        show_progress=False,
    )
    return loop, get_adapter_state(model)


def test_dropped_clients_are_listed_and_the_rest_averaged(tiny_model_dir, tmp_path) -> None:
    runner = FakeRunner(drop={-1})  # filled in below, once the selection is known
    loop, x0 = loop_for(tiny_model_dir, tmp_path / "run", runner, min_replies=2)
    first = loop.plan(0, x0, {}).tasks
    runner.drop = {first[0].client_id}
    loop.run([])
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    lines = [line for line in lines if line["round"] >= 1]
    assert lines[0]["dropped"] == [{"client": first[0].client_id, "reason": "timeout"}]
    answered = [t.client_id for t in first[1:]]
    assert [c["id"] for c in lines[0]["clients"]] == answered  # sorted by client id
    assert lines[0]["clients"][0]["bytes_up"] == 20 + answered[0]
    # FedAvg with equal weights over the two that answered: round 2 starts at x + mean(k + 1).
    shift = sum(k + 1.0 for k in answered) / 2
    for name, tensor in runner.starts[1].items():
        assert torch.allclose(tensor, x0[name] + shift), name
    assert completed_rounds(tmp_path / "run") == [1, 2]


def test_too_few_replies_stop_before_the_round_commits(tiny_model_dir, tmp_path) -> None:
    runner = FakeRunner(drop=set(range(5)) - {0})
    loop, _ = loop_for(tiny_model_dir, tmp_path / "run", runner, min_replies=2)
    with pytest.raises(TooFewRepliesError, match=r"round 1: \d valid update\(s\), 2 needed"):
        loop.run([])
    assert completed_rounds(tmp_path / "run") == []


def test_non_finite_replies_count_as_missing(tiny_model_dir, tmp_path) -> None:
    runner = FakeRunner(drop=set(), spoil=set(range(5)))
    loop, _ = loop_for(tiny_model_dir, tmp_path / "run", runner, min_replies=1)
    with pytest.raises(Exception, match="every client was rejected"):
        loop.run([])
    assert completed_rounds(tmp_path / "run") == []
