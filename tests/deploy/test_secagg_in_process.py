"""Secure aggregation's rounds without the network: the coordinator's FlowerRunner and
three DataOwners in this process (as in test_rounds_in_process.py), every stage message
and reply serialised and parsed back as Flower carries it.

Checked: what the coordinator receives from each client is not that client's quantised
update nor near it, while the unmasked mean equals the plain FedAvg aggregate within the
stated quantisation bound; a client leaving after each stage still gives the survivors'
mean; too many leaving stops the run with nothing committed; malformed or out-of-order
stage messages are refused with their reason.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from safetensors.torch import load_file

from fedit.config import RunConfig, load_config
from fedit.deploy.coordinator import CoordinatorSide
from fedit.deploy.pki import make_node_key
from fedit.deploy.secagg import crypto, stages
from fedit.deploy.secagg.coordinator import STAGE_NAMES, SecureAggregationError
from fedit.engine.rounds import RoundLoop
from fedit.engine.simulation import Simulation
from fedit.models.adapters import get_adapter_state
from fedit.protocol.traffic import run_header, task_content
from fedit.seeding import Stream, derive_seed
from tests.deploy.conftest import owner_files, run_overrides
from tests.deploy.test_rounds_in_process import (
    NODE_BASE,
    LoopbackOwners,
    deploy_rounds,
    metrics,
    owners_for,
)

BITS = 20  # few enough levels that the quantisation error is visible beside float32's
CLIP = 2.0
EPS32 = torch.finfo(torch.float32).eps


def carried(content: RecordDict) -> RecordDict:
    """The content as the other end reads it: Flower's serialisation and back."""
    return recorddict_from_proto(recorddict_to_proto(content))


class SecureLoopback(LoopbackOwners):
    """The owners in process; `leaves[k]` is the first stage client k does not answer
    (it is gone from then on), `tamper(k, stage, reply)` may alter a reply."""

    def __init__(self, owners, public_keys, leaves=None, tamper=None) -> None:
        super().__init__(owners, public_keys)
        self.leaves, self.tamper = leaves or {}, tamper
        self.gone: set[int] = set()
        self.received: dict[tuple[int, int, str], RecordDict] = {}  # (round, k, stage)

    def exchange(self, _grid, messages: list[Message], _deadline: float, **_: object):
        answers = {}
        for message in messages:
            k, stage = message.metadata.dst_node_id - NODE_BASE, message.metadata.message_type
            if self.leaves.get(k) == stage:
                self.gone.add(k)
            if k in self.gone:
                continue
            sent = Message(
                carried(message.content),
                dst_node_id=message.metadata.dst_node_id,
                message_type=stage,
                group_id=message.metadata.group_id,
            )
            content = self.owners[k].handle(sent)
            if self.tamper is not None:
                content = self.tamper(k, stage, content)
            self.replies.append((k, content["status"]["outcome"]))
            reply = Message(carried(content), reply_to=message)
            self.received[(int(message.metadata.group_id), k, stage)] = reply.content
            answers[message.metadata.dst_node_id] = reply
        return answers


def secure_configs(root: Path, model_dir: Path, rounds: int = 1, owners: int = 3, **extra: object):
    """(plain simulation config, secure deployment config, owner files, public keys)."""
    files, heldout = owner_files(root, owners)
    keys = [make_node_key(root / f"owner{k}.key", force=False) for k in range(owners)]
    common = {
        "federation.rounds": rounds,
        "eval.every_rounds": 1,
        "partition.num_clients": owners,
        "federation.clients_per_round": owners,
        **extra,
    }
    sim = load_config(
        None, run_overrides(model_dir, root / "sim", root, heldout, "fedavg", **common)
    )
    secure = {
        "deploy.clients": [str(pub) for _, pub in keys],
        "deploy.min_replies": 1,
        "secagg.enabled": True,
        "secagg.bits": BITS,
        "secagg.clip_range": CLIP,
        "secagg.stage_timeout": 5.0,
    }
    dep = load_config(
        None, run_overrides(model_dir, root / "dep", root, heldout, "fedavg", **common, **secure)
    )
    return sim, dep, files, [pub.read_bytes() for _, pub in keys]


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every (w_k·Δ_k, its quantised vector) an owner computes, in order."""
    seen = []
    quantise = crypto.quantise

    def recording(vector, params, seed):
        q = quantise(vector, params, seed)
        seen.append((vector.copy(), q.copy()))
        return q

    monkeypatch.setattr(crypto, "quantise", recording)
    return seen


def start_adapter(cfg: RunConfig) -> dict[str, torch.Tensor]:
    return get_adapter_state(CoordinatorSide.prepare(cfg).model)


def adapter(cfg: RunConfig, n: int) -> dict[str, torch.Tensor]:
    return load_file(Path(cfg.output_dir) / f"round_{n:04d}" / "adapter_model.safetensors")


def flat(state: dict[str, torch.Tensor]) -> np.ndarray:
    return crypto.flatten(state, {k: tuple(v.shape) for k, v in state.items()})


def assert_within(got: np.ndarray, expected: np.ndarray, start: np.ndarray, bound: float):
    """|got − expected| ≤ the quantisation bound plus float32 rounding of x + Δ (a few
    ulps of the entries involved), and not all of it float32's: the sum was quantised."""
    rounding = 4 * EPS32 * (np.abs(expected) + np.abs(start))
    error = np.abs(got - expected)
    assert np.all(error <= bound + rounding), float(np.max(error - bound - rounding))
    assert np.any(error > rounding)


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_the_coordinator_sees_masked_inputs_and_learns_the_fedavg_mean(
    weighting: str,
    recorded,
    monkeypatch: pytest.MonkeyPatch,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    sim, dep, files, keys = secure_configs(
        tmp_path, tiny_model_dir, **{"strategy.weighting": weighting}
    )
    Simulation(sim, show_progress=False).run()
    loopback = SecureLoopback(owners_for(tmp_path, files, dep), keys)
    run = deploy_rounds(monkeypatch, dep, loopback)
    assert run.finished == (True, "")

    params = crypto.RoundParams(BITS, CLIP, 3)
    masked = [loopback.received[(1, k, stages.MASKED)] for k in range(3)]
    assert len(recorded) == 3  # one quantised update per owner, in client order
    for (vector, quantised), reply in zip(recorded, masked, strict=True):
        assert np.max(np.abs(vector)) < CLIP  # nothing clipped: the bound below applies
        seen = reply["masked"]["vector"].numpy()
        ours = seen[: len(quantised)]
        # not the update: the update's entries lie within ±spread of the midpoint R/2,
        # what the coordinator got is spread over the whole ring Z_{2^bits}
        mid = params.levels // 2
        spread = int(np.max(np.abs(quantised.astype(np.int64) - mid))) + 1
        uniform = 2 * spread / 2**BITS  # the share of uniform values within ±spread
        assert uniform < 0.2
        gap = np.minimum((ours - quantised) % 2**BITS, (quantised - ours) % 2**BITS)
        assert np.mean(gap < spread) < 2 * uniform + 0.05
        assert np.mean(np.abs(ours.astype(np.int64) - mid) < spread) < 2 * uniform + 0.05
        # and read as an update it is nowhere near one
        as_update = crypto.dequantise_sum(ours, params, 1)
        assert np.mean(np.abs(as_update - vector)) > CLIP / 4
        assert set(reply.keys()) == {"status", "masked", "metrics"}
        assert set(reply["metrics"].keys()) == {"train_loss"}

    line = metrics(dep)[-1]
    record = line["secure_aggregation"]
    weights = [1.0] * 3 if weighting == "uniform" else None
    assert record["survivors"] == 3 and record["levels"] == params.levels
    if weights is None:  # Σ n_k, summed under the masks as the count entry
        assert record["num_examples"] == sum(c["num_examples"] for c in metrics(sim)[-1]["clients"])
    bound = params.error_bound(3, record["num_examples"])
    assert record["quantisation_error_bound"] == pytest.approx(bound)
    assert_within(flat(adapter(dep, 1)), flat(adapter(sim, 1)), flat(start_adapter(dep)), bound)
    for client in line["clients"]:
        assert set(client) == {"id", "train_loss", "bytes_down", "bytes_up"}
    assert [c["id"] for c in line["clients"]] == [0, 1, 2]


@pytest.mark.parametrize(
    "stage, survivors",
    [
        (stages.SHARES, [0, 2]),  # after (a): its keys only, no shares
        (stages.MASKED, [0, 2]),  # after (b): its pair masks are rebuilt from shares
        (stages.UNMASK, [0, 1, 2]),  # after (c): its self mask is rebuilt from shares
    ],
)
def test_a_client_leaving_after_any_stage_leaves_the_survivors_mean(
    stage: str,
    survivors: list[int],
    recorded,
    monkeypatch: pytest.MonkeyPatch,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    _, dep, files, keys = secure_configs(
        tmp_path, tiny_model_dir, **{"strategy.weighting": "uniform"}
    )
    start = flat(start_adapter(dep))
    loopback = SecureLoopback(owners_for(tmp_path, files, dep), keys, leaves={1: stage})
    deploy_rounds(monkeypatch, dep, loopback)

    trained = dict(zip(survivors, (vector for vector, _ in recorded), strict=True))
    expected = start + sum(trained[k] for k in survivors) / len(survivors)
    bound = crypto.RoundParams(BITS, CLIP, 3).error_bound(len(survivors), len(survivors))
    assert_within(flat(adapter(dep, 1)), expected, start, bound)
    line = metrics(dep)[-1]
    assert [c["id"] for c in line["clients"]] == survivors
    assert line["dropped"] == [{"client": 1, "reason": f"timeout ({STAGE_NAMES[stage]})"}]


def test_a_dropped_client_no_survivor_masked_with_needs_no_mask_key(
    recorded, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Five clients on a ring (k = 2, t = 2): c's two neighbours leave before sharing, c
    after sharing. No survivor masked with c, so its mask key is not needed (and nobody
    holds a share of it): the round sums the two survivors, neighbours of each other."""
    _, dep, files, keys = secure_configs(
        tmp_path,
        tiny_model_dir,
        owners=5,
        **{"strategy.weighting": "uniform", "secagg.neighbours": 2},
    )
    seed = derive_seed(dep.seed, Stream.SECAGG_GRAPH, 0)
    graph = crypto.neighbours(list(range(5)), 2, seed)
    c, (b, d) = 0, graph[0]
    survivors = sorted({1, 2, 3, 4} - {b, d})
    leaves = {b: stages.SHARES, d: stages.SHARES, c: stages.MASKED}
    start = flat(start_adapter(dep))
    loopback = SecureLoopback(owners_for(tmp_path, files, dep), keys, leaves=leaves)
    deploy_rounds(monkeypatch, dep, loopback)

    line = metrics(dep)[-1]
    assert [client["id"] for client in line["clients"]] == survivors
    assert sorted(gone["client"] for gone in line["dropped"]) == sorted([b, c, d])
    assert len(recorded) == 2  # the survivors' updates, in client order
    expected = start + (recorded[0][0] + recorded[1][0]) / 2
    bound = crypto.RoundParams(BITS, CLIP, 5).error_bound(2, 2)
    assert_within(flat(adapter(dep, 1)), expected, start, bound)


@pytest.mark.parametrize(
    "leaves, why",
    [
        ({1: stages.KEYS, 2: stages.KEYS}, "1 client.s. left after the keys stage, 2"),
        ({1: stages.MASKED, 2: stages.MASKED}, "1 client.s. left after the masked"),
        ({1: stages.UNMASK, 2: stages.UNMASK}, "self mask cannot be rebuilt: 1 share"),
    ],
)
def test_too_many_leaving_stops_the_round_with_nothing_committed(
    leaves, why: str, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    _, dep, files, keys = secure_configs(tmp_path, tiny_model_dir)
    loopback = SecureLoopback(owners_for(tmp_path, files, dep), keys, leaves=leaves)
    with pytest.raises(SecureAggregationError, match=why) as stopped:
        deploy_rounds(monkeypatch, dep, loopback)
    assert "client 1: timeout" in str(stopped.value) and "--resume" in str(stopped.value)
    assert not (Path(dep.output_dir) / "round_0001").exists()
    lines = (Path(dep.output_dir) / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["round"] == 0 for line in lines)


def test_a_malformed_masked_input_is_rejected_and_treated_as_leaving(
    recorded, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Client 1's vector arrives as int64: rejected with the reason, and the round goes on
    as if it had left after sharing its secrets."""
    _, dep, files, keys = secure_configs(
        tmp_path, tiny_model_dir, **{"strategy.weighting": "uniform"}
    )

    def bad_dtype(k: int, stage: str, content: RecordDict) -> RecordDict:
        if k == 1 and stage == stages.MASKED:
            vector = content["masked"]["vector"].numpy().astype(np.int64)
            content["masked"]["vector"] = Array.from_numpy_ndarray(vector)
        return content

    start = flat(start_adapter(dep))
    loopback = SecureLoopback(owners_for(tmp_path, files, dep), keys, tamper=bad_dtype)
    deploy_rounds(monkeypatch, dep, loopback)
    line = metrics(dep)[-1]
    assert [c["id"] for c in line["clients"]] == [0, 2]
    (rejected,) = line["rejected"]
    assert rejected["client"] == 1
    assert "malformed reply: masked.vector: int64" in rejected["reason"]
    expected = start + (recorded[0][0] + recorded[2][0]) / 2
    bound = crypto.RoundParams(BITS, CLIP, 3).error_bound(2, 2)
    assert_within(flat(adapter(dep, 1)), expected, start, bound)


def test_owners_refuse_stages_out_of_order_and_plain_tasks_of_a_secure_run(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    _, dep, files, keys = secure_configs(tmp_path, tiny_model_dir, rounds=2)
    loopback = SecureLoopback(owners_for(tmp_path, files, dep), keys)
    deploy_rounds(monkeypatch, dep, loopback)
    owner = loopback.owners[0]
    side = CoordinatorSide.prepare(dep)
    header = run_header(dep, side.model)
    assert header.config_sha256 == owner.session.header.config_sha256

    def ask(stage: str, content: RecordDict) -> tuple[str, str]:
        message = Message(content, dst_node_id=NODE_BASE, message_type=stage, group_id="3")
        status = owner.handle(message)["status"]
        return status["outcome"], status["reason"]

    shares = stages.encode_request(
        stages.SHARES,
        header,
        3,
        0,
        neighbours=[1],
        enc_keys=[b"k" * 32],
        mask_keys=[b"m" * 32],
    )
    assert ask(stages.SHARES, shares) == ("refused", "secagg: no keys of round 3 here")
    keys_request = stages.encode_request(stages.KEYS, header, 3, 0, sampled=3)
    assert ask(stages.KEYS, keys_request)[0] == "ok"
    unmask = stages.encode_request(stages.UNMASK, header, 3, 0, survivors=[0], dropped=[])
    outcome, reason = ask(stages.UNMASK, unmask)
    assert (outcome, reason) == (
        "refused",
        f"secagg: {stages.UNMASK} after {stages.KEYS}, out of order",
    )
    other = stages.encode_request(stages.KEYS, header, 3, 2, sampled=3)
    assert ask(stages.KEYS, other) == (
        "refused",
        "round.client_id: 2, but this owner is client 0",
    )
    # a plaintext task for this run, which promised its owners a sum
    plan = side_plan(dep, side)
    plain = task_content(plan.tasks[0], get_adapter_state(side.model), header)
    outcome, reason = ask("train", plain)
    assert outcome == "refused" and reason.startswith("secagg.enabled: this run's config enables")


def side_plan(cfg: RunConfig, side: CoordinatorSide):
    loop = RoundLoop(
        cfg,
        side.model,
        runner=None,  # only the plan is asked for
        num_clients=3,
        train_cfgs={"sft": cfg.train, "dpo": cfg.train},
        base_originals={},
    )
    return loop.plan(2, get_adapter_state(side.model), {})


def test_engines_without_a_coordinator_across_the_network_refuse_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`fedit train` and `fedit simulate-ray` refuse secagg.enabled (nothing to hide in one
    machine; the runtime's workers could not keep a client's secrets between stages), and
    a deployment needs two clients a round."""
    from fedit.config import ConfigError, rules

    _, dep, _, _ = secure_configs(tmp_path, tiny_model_dir)
    with pytest.raises(ConfigError, match="secagg.enabled: secure aggregation hides"):
        Simulation(dep, show_progress=False).run()
    assert not Path(dep.output_dir).exists()
    with pytest.raises(ConfigError, match="secagg.enabled: the runtime's workers"):
        rules.check(dep, "simulate-ray")
    rules.check(dep, "coordinate")
    one = replace(dep, federation=replace(dep.federation, clients_per_round=1))
    with pytest.raises(ConfigError, match="federation.clients_per_round: secure aggregation"):
        rules.check(one, "coordinate")


def test_owners_that_insist_refuse_a_run_without_secure_aggregation(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`fedit join --secure-aggregation-only`: a coordinator that switches secagg off gets
    no plaintext update from such an owner."""
    from fedit.deploy.owner import DataOwner
    from fedit.server.validation import AllUpdatesRejectedError

    _, dep, files, keys = secure_configs(tmp_path, tiny_model_dir)
    plain = replace(dep, secagg=replace(dep.secagg, enabled=False))
    owners = [
        DataOwner.joining(replace(o.sessions.inputs, secure_only=True))
        for o in owners_for(tmp_path, files, plain)
    ]
    with pytest.raises(AllUpdatesRejectedError, match="--secure-aggregation-only"):
        deploy_rounds(monkeypatch, plain, SecureLoopback(owners, keys))
    assert not (Path(plain.output_dir) / "round_0001").exists()


def test_a_low_order_public_key_is_refused_at_the_keys_stage(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A client advertising the all-zero key (every pair's secret would be zero) is
    rejected before any graph is drawn; the round goes on with the others."""
    _, dep, files, keys = secure_configs(tmp_path, tiny_model_dir)

    def zero_key(k: int, stage: str, content: RecordDict) -> RecordDict:
        if k == 2 and stage == stages.KEYS:
            content["secagg"]["mask_key"] = bytes(32)
        return content

    loopback = SecureLoopback(owners_for(tmp_path, files, dep), keys, tamper=zero_key)
    deploy_rounds(monkeypatch, dep, loopback)
    line = metrics(dep)[-1]
    assert [c["id"] for c in line["clients"]] == [0, 1]
    assert line["rejected"] == [
        {
            "client": 2,
            "reason": "malformed reply: secagg: a public key of low order (secagg keys)",
        }
    ]
