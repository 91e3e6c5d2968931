"""Local DP releases at most once per (run, round) (fedit.client.releases): the same client
asked for the same round again, in process or after a restart, sends the identical release
and trains nothing; a new round is a new release, and the client counts what it made."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedit.client import session
from fedit.client.releases import KEPT_RELEASES, Releases
from fedit.config import TrainConfig
from fedit.models.adapters import get_adapter_state
from fedit.types import ClientTask, ClientUpdate
from tests.conftest import tiny_local_client
from tests.unit.test_privacy import plan

TRAIN = TrainConfig(micro_batch_size=2, grad_accum_steps=1, max_steps=1, learning_rate=1e-2)


def local_client(model_dir: Path, directory: Path):
    # noise from the OS: a repeated release cannot be equal by a seed
    local = plan("local", noise_multiplier=0.7, clip_norm=0.5, reproducible_noise=False)
    return tiny_local_client(model_dir, privacy=local, releases=Releases(directory))


def assert_same_release(a: ClientUpdate, b: ClientUpdate) -> None:
    assert a.state.keys() == b.state.keys()
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert (a.num_examples, a.num_steps, a.learning_rate, a.metrics) == (
        b.num_examples,
        b.num_steps,
        b.learning_rate,
        b.metrics,
    )


def test_a_round_asked_again_gets_the_same_release_without_training(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, client = local_client(tiny_model_dir, tmp_path / "client_0")
    x = get_adapter_state(model)
    task = ClientTask(1, 0, "sft", 1e-2, 3)
    first = client.train(model, x, task, TRAIN)
    assert isinstance(first, ClientUpdate)

    def refuse(*args, **kwargs):
        raise AssertionError("a released round was trained again")

    monkeypatch.setattr(session, "train_client", refuse)
    again = client.train(model, x, task, TRAIN)
    assert isinstance(again, ClientUpdate)
    assert_same_release(first, again)
    # a restarted owner: a new client on the same disk
    _, restarted = local_client(tiny_model_dir, tmp_path / "client_0")
    assert_same_release(first, restarted.train(model, x, task, TRAIN))
    assert Releases(tmp_path / "client_0").released() == [1]


def test_a_repeated_request_on_another_adapter_resends_the_same_noised_delta(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model, client = local_client(tiny_model_dir, tmp_path / "c")
    x = get_adapter_state(model)
    task = ClientTask(1, 0, "sft", 1e-2, 3)
    first = client.train(model, x, task, TRAIN)
    moved = {k: v + 1.0 for k, v in x.items()}  # the server knows x: post-processing
    again = client.train(model, moved, task, TRAIN)
    assert isinstance(first, ClientUpdate) and isinstance(again, ClientUpdate)
    for k in x:
        assert torch.allclose(again.state[k] - moved[k], first.state[k] - x[k], atol=1e-6)


def test_new_rounds_are_new_releases_and_each_is_counted(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model, client = local_client(tiny_model_dir, tmp_path / "c")
    x = get_adapter_state(model)
    sent = {}
    for r in (1, 2, 3, 3, 2):
        update = client.train(model, x, ClientTask(r, 0, "sft", 1e-2, 3), TRAIN)
        assert isinstance(update, ClientUpdate)
        sent.setdefault(r, []).append(update)
    assert_same_release(*sent[3])
    assert not torch.equal(*(next(iter(sent[r][0].state.values())) for r in (1, 2)))
    # rounds 2 and 3 are kept (KEPT_RELEASES = 2); each round released once
    assert KEPT_RELEASES == 2
    assert_same_release(*sent[2])
    assert Releases(tmp_path / "c").released() == [1, 2, 3]
    # round 1 is no longer kept: asked again, it is a new release, and counted
    client.train(model, x, ClientTask(1, 0, "sft", 1e-2, 3), TRAIN)
    assert Releases(tmp_path / "c").released() == [1, 2, 3, 1]


def test_local_dp_and_a_release_store_come_together(tiny_model_dir: Path, tmp_path) -> None:
    with pytest.raises(ValueError, match="releases kept"):
        tiny_local_client(tiny_model_dir, privacy=plan("local"))
    with pytest.raises(ValueError, match="releases kept"):
        tiny_local_client(tiny_model_dir, releases=Releases(tmp_path))
