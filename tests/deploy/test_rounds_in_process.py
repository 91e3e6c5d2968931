"""The deployment engine's rounds without the network: the coordinator's FlowerRunner and
three DataOwners in this process, each task delivered to its owner's `handle` as the
message Flower would carry (encoded, decoded, checked), each reply the same way back.

This is everything of a deployment but Flower's transport (test_federation.py runs that
for two strategies), cheap enough to check every strategy and both objectives against the
simulation of the same config, bit for bit, and the owners' recovery paths: an owner that
lost its SCAFFOLD c_k or its DPO "sft" reference is sent them again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from fedit.config import RunConfig, load_config, rules
from fedit.data.preferences import synthetic_pairs
from fedit.data.readers import read_records, write_records_jsonl
from fedit.data.synthetic import generate_conversations
from fedit.deploy import coordinator
from fedit.deploy.coordinator import CoordinatorSide
from fedit.deploy.flower.flower_io import NodeInfo
from fedit.deploy.owner import DataOwner, OwnerInputs
from fedit.deploy.pki import make_node_key
from fedit.engine.rounds import completed_run
from fedit.engine.simulation import Simulation
from fedit.errors import RunStopped
from fedit.server.strategies import STRATEGIES
from tests.deploy.conftest import owner_files, run_overrides

NODE_BASE = 1000  # owner k is node NODE_BASE + k


class LoopbackOwners:
    """The owners' side of FlowerRunner in this process (stands in for
    flower_io.online_nodes and flower_io.exchange)."""

    def __init__(
        self, owners: list[DataOwner], public_keys: list[bytes], crash_at: int | None = None
    ) -> None:
        self.owners, self.public_keys, self.crash_at = owners, public_keys, crash_at
        self.replies: list[tuple[int, str]] = []  # (client, outcome) in order

    def online_nodes(self, _grid: object) -> list[NodeInfo]:
        return [
            NodeInfo(NODE_BASE + k, f"owner-{k}", key) for k, key in enumerate(self.public_keys)
        ]

    def exchange(self, _grid: object, messages: list[Message], _deadline: float, **_: object):
        if messages and messages[0].metadata.group_id == str(self.crash_at):
            raise CoordinatorKilled
        answers = {}
        for message in messages:
            k = message.metadata.dst_node_id - NODE_BASE
            content = self.owners[k].handle(message)
            self.replies.append((k, content["status"]["outcome"]))
            answers[message.metadata.dst_node_id] = Message(content, reply_to=message)
        return answers


class CoordinatorKilled(Exception):
    """The coordinator's process ends in the middle of a round."""


class FakeRun:
    grid = None
    finished: tuple[bool, str] | None = None

    def finish(self, ok: bool, reason: str) -> None:
        self.finished = (ok, reason)


def write_pair_files(directory: Path) -> Path:
    """Three owners' preference pairs (their skills apart) and a held-out pairs file."""
    pairs = synthetic_pairs(per_skill=6, seed=3)
    skills = sorted({p.category for p in pairs})
    heldout = pairs[::9][:6]
    rows = [p for p in pairs if p not in heldout]

    def write(path: Path, items) -> None:
        lines = [
            json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected})
            for p in items
        ]
        path.write_text("\n".join(lines) + "\n")

    for k in range(3):
        mine = {s for i, s in enumerate(skills) if i % 3 == k}
        write(directory / f"pairs_{k}.jsonl", [p for p in rows if p.category in mine])
    write(directory / "heldout_pairs.jsonl", heldout)
    return directory / "heldout_pairs.jsonl"


def configs(root: Path, model_dir: Path, strategy: str, **extra: object):
    """(simulation config, deployment config, the owners' record files) of one federation."""
    files, heldout = owner_files(root)
    keys = [make_node_key(root / f"owner{k}.key", force=False) for k in range(3)]
    deploy = {
        "deploy.clients": [str(pub) for _, pub in keys],
        "deploy.min_replies": 3,
    }
    sim_overrides = run_overrides(model_dir, root / "sim", root, heldout, strategy, **extra)
    sim = load_config(None, sim_overrides)
    dep = load_config(
        None,
        run_overrides(model_dir, root / "dep", root, heldout, strategy, **extra, **deploy),
    )
    return sim, dep, files, [pub.read_bytes() for _, pub in keys]


def owners_for(root: Path, files: list[Path], cfg: RunConfig, tag: str = "") -> list[DataOwner]:
    pairs = bool(cfg.data.preference_path)
    return [
        DataOwner.joining(
            OwnerInputs(
                data=files[k] if cfg.data.path else None,
                preference_data=root / f"pairs_{k}.jsonl" if pairs else None,
                model=None,
                state_dir=root / f"state{tag}_{k}",
            )
        )
        for k in range(len(files))
    ]


def deploy_rounds(
    monkeypatch: pytest.MonkeyPatch, cfg: RunConfig, loopback: LoopbackOwners, resume=False
) -> FakeRun:
    """`fedit coordinate`'s rounds over the loopback owners instead of Flower."""
    # Messages are stamped with the run, task and node of this process's ServerApp
    for field, value in (("_run_id", 7), ("_task_id", 8), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, field, value)
    monkeypatch.setattr(coordinator, "online_nodes", loopback.online_nodes)
    monkeypatch.setattr(coordinator, "exchange", loopback.exchange)
    rules.check(cfg, "coordinate")
    done = completed_run(cfg, resume)
    run = FakeRun()
    CoordinatorSide.prepare(cfg).run_rounds(cfg, run, done, show_progress=False)
    return run


def assert_same_adapters(sim: RunConfig, dep: RunConfig) -> None:
    for n in range(1, sim.federation.rounds + 1):
        name = f"round_{n:04d}/adapter_model.safetensors"
        a, b = load_file(Path(sim.output_dir) / name), load_file(Path(dep.output_dir) / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (n, key)


def metrics(cfg: RunConfig) -> list[dict]:
    lines = (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_deploys_as_it_simulates(
    strategy: str, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    sim, dep, files, keys = configs(tmp_path, tiny_model_dir, strategy)
    Simulation(sim, show_progress=False).run()
    run = deploy_rounds(monkeypatch, dep, LoopbackOwners(owners_for(tmp_path, files, dep), keys))
    assert run.finished == (True, "")
    assert_same_adapters(sim, dep)
    # the simulation reports the traffic the deployment measured
    for a, b in zip(metrics(sim)[1:], metrics(dep)[1:], strict=True):
        for x, y in zip(a["clients"], b["clients"], strict=True):
            assert x["bytes_up"] == y["bytes_up"] > 0
            # the configs differ only in paths and [deploy], a few bytes of the header
            assert abs(x["bytes_down"] - y["bytes_down"]) < 1024 < y["bytes_down"]


@pytest.mark.parametrize(
    "attack",
    [
        {"attack.kind": "gaussian", "attack.clients": [1]},
        {"attack.kind": "backdoor", "attack.clients": [0, 2], "attack.poison_fraction": 0.5},
    ],
)
def test_a_malicious_owner_attacks_as_the_simulated_client_does(
    attack: dict, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The attack runs in the owner's own LocalClient and on its own records."""
    sim, dep, files, keys = configs(tmp_path, tiny_model_dir, "fedavg", **attack)
    Simulation(sim, show_progress=False).run()
    deploy_rounds(monkeypatch, dep, LoopbackOwners(owners_for(tmp_path, files, dep), keys))
    assert_same_adapters(sim, dep)
    clean, _, _, _ = configs(tmp_path / "clean", tiny_model_dir, "fedavg")
    Simulation(clean, show_progress=False).run()
    name = "round_0001/adapter_model.safetensors"
    a, b = load_file(Path(clean.output_dir) / name), load_file(Path(dep.output_dir) / name)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the attack changed the aggregate
    assert metrics(dep)[-1]["attack"] == {
        "kind": attack["attack.kind"],
        "clients": attack["attack.clients"],
    }


@pytest.mark.parametrize("aggregation", ["zero_pad", "holders"])
def test_mixed_lora_ranks_deploy_as_they_simulate(
    aggregation: str, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Each owner truncates to its rank in its own LocalClient; the coordinator pads and
    aggregates with the round code the simulation runs (int8 uploads from the truncated x)."""
    extra = {
        "lora.client_ranks": [1, 4, 2],
        "strategy.rank_aggregation": aggregation,
        "compression.upload": "int8",
    }
    sim, dep, files, keys = configs(tmp_path, tiny_model_dir, "fedavg", **extra)
    Simulation(sim, show_progress=False).run()
    deploy_rounds(monkeypatch, dep, LoopbackOwners(owners_for(tmp_path, files, dep), keys))
    assert_same_adapters(sim, dep)


@pytest.mark.parametrize(
    "compression",
    [
        {"compression.upload": "int8"},
        {"compression.upload": "topk", "compression.topk_fraction": 0.2},
    ],
)
def test_compressed_uploads_deploy_as_they_simulate(
    compression: dict, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The owners encode (and keep their error-feedback memories in their state dirs) with
    the code the simulated clients run; the coordinator decodes the same bits."""
    sim, dep, files, keys = configs(tmp_path, tiny_model_dir, "fedavg", **compression)
    Simulation(sim, show_progress=False).run()
    deploy_rounds(monkeypatch, dep, LoopbackOwners(owners_for(tmp_path, files, dep), keys))
    assert_same_adapters(sim, dep)
    for a, b in zip(metrics(sim)[1:], metrics(dep)[1:], strict=True):
        assert [x["bytes_up"] for x in a["clients"]] == [y["bytes_up"] for y in b["clients"]]
    memories = sorted(tmp_path.glob("state_*/*/feedback/client_*/round_*.safetensors"))
    assert memories  # error feedback is on by default, for every lossy codec


def test_fedsa_lora_deploys_as_it_simulates(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Each owner keeps its B factors in its state dir with the code the simulated clients
    run; the A factors alone cross the wire both ways, and the aggregates agree."""
    sim, dep, files, keys = configs(tmp_path, tiny_model_dir, "fedavgm", **{"lora.shared": "A"})
    Simulation(sim, show_progress=False).run()
    deploy_rounds(monkeypatch, dep, LoopbackOwners(owners_for(tmp_path, files, dep), keys))
    assert_same_adapters(sim, dep)
    for a, b in zip(metrics(sim)[1:], metrics(dep)[1:], strict=True):
        for x, y in zip(a["clients"], b["clients"], strict=True):
            assert x["bytes_up"] == y["bytes_up"] and abs(x["bytes_down"] - y["bytes_down"]) < 1024
    simulated = sorted(Path(sim.output_dir).glob("own_factors/client_*/round_*.safetensors"))
    owned = sorted(tmp_path.glob("state_*/*/own_factors/client_*/round_*.safetensors"))
    assert len(simulated) == len(owned) > 0
    for a, b in zip(simulated, owned, strict=True):
        assert a.parts[-2:] == b.parts[-2:] and a.read_bytes() == b.read_bytes()


def test_conversations_deploy_as_they_simulate(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Each owner reads its own file of multi-turn `messages` records and tokenises them
    under the chat template with the code the simulated clients run: the same adapters."""
    sim, dep, files, keys = configs(tmp_path, tiny_model_dir, "fedavg", **{"data.template": "chat"})
    chats = generate_conversations(per_skill=3, seed=3)
    for k, path in enumerate(files):
        write_records_jsonl(chats[k::3], path)
    assert all(record.history for record in read_records(str(files[0])))
    Simulation(sim, show_progress=False).run()
    deploy_rounds(monkeypatch, dep, LoopbackOwners(owners_for(tmp_path, files, dep), keys))
    assert_same_adapters(sim, dep)


@pytest.mark.parametrize(
    "objective, reference",
    [("dpo", "base"), ("dpo", "round_start"), ("sft_then_dpo", "sft")],
)
def test_dpo_deploys_as_it_simulates(
    objective: str,
    reference: str,
    monkeypatch: pytest.MonkeyPatch,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    heldout_pairs = write_pair_files(tmp_path)
    extra = {
        "train.objective": objective,
        "dpo.reference": reference,
        "dpo.sft_rounds": 1 if objective == "sft_then_dpo" else 0,
        "federation.rounds": 3 if objective == "sft_then_dpo" else 2,
        "data.preference_path": str(tmp_path / "pairs_*.jsonl"),
        "data.heldout_preference_path": str(heldout_pairs),
        **({} if objective == "sft_then_dpo" else {"data.path": "", "data.heldout_path": ""}),
        "dpo.beta": 0.5,
    }
    sim, dep, files, keys = configs(tmp_path, tiny_model_dir, "fedavg", **extra)
    Simulation(sim, show_progress=False).run()
    deploy_rounds(monkeypatch, dep, LoopbackOwners(owners_for(tmp_path, files, dep), keys))
    assert_same_adapters(sim, dep)
    last_sim, last_dep = metrics(sim)[-1], metrics(dep)[-1]
    assert last_dep["objective"] == "dpo"
    assert last_dep["heldout_dpo"] == last_sim["heldout_dpo"]  # the coordinator's own pairs
    assert ("heldout" in last_dep) == (objective == "sft_then_dpo")


def test_owners_that_lost_their_state_get_it_again(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """SCAFFOLD + sft_then_dpo with reference "sft": after round 2 the coordinator stops
    and every owner loses its disk (c_k versions, the DPO reference log-probs); the resumed
    run re-sends both in full and still trains what the simulation trains."""
    heldout_pairs = write_pair_files(tmp_path)
    extra = {
        "train.objective": "sft_then_dpo",
        "dpo.reference": "sft",
        "dpo.sft_rounds": 1,
        "federation.rounds": 3,
        "data.preference_path": str(tmp_path / "pairs_*.jsonl"),
        "data.heldout_preference_path": str(heldout_pairs),
    }
    sim, dep, files, keys = configs(tmp_path, tiny_model_dir, "scaffold", **extra)
    Simulation(sim, show_progress=False).run()
    with pytest.raises(CoordinatorKilled):
        deploy_rounds(
            monkeypatch, dep, LoopbackOwners(owners_for(tmp_path, files, dep), keys, crash_at=3)
        )
    for k in range(3):
        shutil.rmtree(tmp_path / f"state_{k}")
    fresh = LoopbackOwners(owners_for(tmp_path, files, dep), keys)
    deploy_rounds(monkeypatch, dep, fresh, resume=True)
    assert_same_adapters(sim, dep)
    outcomes = [outcome for _, outcome in fresh.replies]
    assert outcomes[:3] == ["needs_c_k"] * 3  # asked first by digest, as always
    assert outcomes[3:] == ["ok"] * 3
    assert all((tmp_path / f"state_{k}").is_dir() for k in range(3))


def test_a_restarted_owner_whose_data_file_changed_refuses_the_run(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """An owner restarted on another --data file at the same path refuses the rest of the
    run, naming the file; its client would otherwise train on other records from then on."""
    _, dep, files, keys = configs(tmp_path, tiny_model_dir, "fedavg")
    mine = tmp_path / "mine" / "data.jsonl"  # owner 1's own copy, not the config's glob
    mine.parent.mkdir()
    shutil.copy(files[1], mine)
    own = [files[0], mine, files[2]]
    with pytest.raises(CoordinatorKilled):
        deploy_rounds(
            monkeypatch, dep, LoopbackOwners(owners_for(tmp_path, own, dep), keys, crash_at=2)
        )
    mine.write_text(mine.read_text().replace('"response": "', '"response": "so: ', 1))
    restarted = LoopbackOwners(owners_for(tmp_path, own, dep), keys)
    with pytest.raises(RunStopped, match=rf"client 1: .*--data: {mine} changed"):
        deploy_rounds(monkeypatch, dep, restarted, resume=True)
    assert (1, "refused") in restarted.replies
