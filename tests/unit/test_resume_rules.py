"""What --resume accepts, the client-state store and the metrics rebuild (no model needed)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedit import fingerprint
from fedit.config import ConfigError, load_config
from fedit.engine import run_dir
from fedit.engine.checkpoint import ClientStateStore
from fedit.engine.run_dir import rebuild_metrics, resume_conflicts
from fedit.errors import write_atomic

SAVED = [
    "data.path=synthetic",
    "seed=42",
    "train.learning_rate=0.005",
    "federation.rounds=3",
    'deploy.clients=["a.pub", "b.pub", "c.pub"]',
]


@pytest.mark.parametrize(
    ("changes", "conflicts"),
    [
        ([], []),
        (["federation.rounds=6"], []),
        (["federation.rounds=2"], []),  # fewer than done is refused by check_resume
        (
            [
                "eval.every_rounds=2",
                "eval.at_start=false",
                "eval.batch_size=3",
                "eval.max_new_tokens=9",
                "eval.compare=base",
                "train.threads=1",
                "output_dir=moved",
            ],
            [],
        ),
        (
            ["seed=99", "train.learning_rate=0.01"],
            ["seed (42 -> 99)", "train.learning_rate (0.005 -> 0.01)"],
        ),
        (["strategy.name=fedavgm"], ["strategy.name ('fedavg' -> 'fedavgm')"]),
        (["strategy.server_momentum=0.5"], ["strategy.server_momentum (0.9 -> 0.5)"]),
        (
            ["strategy.lora_aggregation=exact"],
            ["strategy.lora_aggregation ('separate' -> 'exact')"],
        ),
        (["lora.r=16"], ["lora.r (8 -> 16)"]),
        (["lora.alpha=8"], ["lora.alpha (16 -> 8)"]),
        (["lora.dropout=0.0"], ["lora.dropout (0.05 -> 0.0)"]),
        (["lora.target_modules=q_proj"], ["lora.target_modules (['all-linear'] -> ['q_proj'])"]),
        (["lora.last_layers=2"], ["lora.last_layers (None -> 2)"]),
        (["data.path=other.jsonl"], ["data.path ('synthetic' -> 'other.jsonl')"]),
        (["data.max_seq_len=128"], ["data.max_seq_len (256 -> 128)"]),
        (["partition.method=iid"], ["partition.method ('category_shards' -> 'iid')"]),
        (["model.name_or_path=other"], ["model.name_or_path ('embedded' -> 'other')"]),
        (["train.mixed_precision=off"], ["train.mixed_precision ('auto' -> 'off')"]),
        (["train.max_steps=3"], ["train.max_steps (None -> 3)"]),
        (["dpo.beta=0.2"], ["dpo.beta (0.1 -> 0.2)"]),
        (
            [
                'deploy.fleet_address="127.0.0.1:9000"',
                "deploy.certs_dir=other",
                "deploy.round_timeout=60",
                "deploy.min_replies=3",
                "deploy.insecure=true",
            ],
            [],
        ),
        (  # the roster maps client ids to owners' keys: reordering it swaps their data
            ['deploy.clients=["b.pub", "a.pub", "c.pub"]'],
            ["deploy.clients (['a.pub', 'b.pub', 'c.pub'] -> ['b.pub', 'a.pub', 'c.pub'])"],
        ),
        (
            ["train.lr_schedule=cosine", "federation.rounds=6"],
            [
                "federation.rounds (3 -> 6: train.lr_schedule = 'cosine' decays over all rounds)",
                "train.lr_schedule ('constant' -> 'cosine')",
            ],
        ),
        (
            ["federation.mode=centralized", "federation.rounds=6"],
            [
                "federation.mode ('federated' -> 'centralized')",
                "federation.rounds (3 -> 6: the centralized step budget is a mean over all rounds)",
            ],
        ),
    ],
)
def test_resume_conflicts(changes: list[str], conflicts: list[str]) -> None:
    saved = load_config(None, SAVED)
    assert resume_conflicts(saved, load_config(None, SAVED + changes)) == conflicts


def test_resume_conflicts_more_rounds_of_a_saved_cosine_schedule() -> None:
    saved = load_config(None, [*SAVED, "train.lr_schedule=cosine"])
    requested = load_config(None, [*SAVED, "train.lr_schedule=cosine", "federation.rounds=4"])
    assert resume_conflicts(saved, requested) == [
        "federation.rounds (3 -> 4: train.lr_schedule = 'cosine' decays over all rounds)"
    ]


def state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([value])}


def commit(store: ClientStateStore, directory: Path) -> None:
    """What save_checkpoint does with store.pending(), then the commit."""
    (directory / "client_state").mkdir(parents=True)
    for client_id, tensors in store.pending().items():
        save_file(tensors, directory / "client_state" / f"{client_id}.safetensors")
    store.commit(directory)


def test_client_state_store_reads_the_newest_committed_version(tmp_path: Path) -> None:
    # Prepare: round 1 sets clients 1 and 2; round 2 sets client 2 again
    store = ClientStateStore([])
    store.put(1, state(1.0))
    store.put(2, state(2.0))
    commit(store, tmp_path / "round_0001")
    store.put(2, state(20.0))
    assert store.get(2)["w"].item() == 20.0  # pending, not yet committed
    commit(store, tmp_path / "round_0002")
    store.put(1, state(100.0))  # round 3 aggregated, then the process dies before its commit

    # Execute: resume after round 2, and after round 1 only
    after_2 = ClientStateStore([tmp_path / "round_0001", tmp_path / "round_0002"])
    after_1 = ClientStateStore([tmp_path / "round_0001"])

    # Assert
    assert [after_2.get(k)["w"].item() for k in (1, 2)] == [1.0, 20.0]
    assert [after_1.get(k)["w"].item() for k in (1, 2)] == [1.0, 2.0]
    assert after_2.get(3) is None and after_2.pending() == {}
    assert sorted(p.name for p in (tmp_path / "round_0002" / "client_state").iterdir()) == [
        "2.safetensors"
    ]


def record(run_dir: Path, round_number: int) -> str:
    line = json.dumps({"round": round_number, "loss": round_number / 10})
    name = "metrics_round0.json" if round_number == 0 else f"round_{round_number:04d}/metrics.json"
    (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / name).write_text(line + "\n")
    return line


@pytest.mark.parametrize(
    "damage",
    ["truncated", "missing", "uncommitted", "duplicated"],
)
def test_rebuild_metrics_gives_one_line_per_committed_round(tmp_path: Path, damage: str) -> None:
    lines = [record(tmp_path, r) for r in (0, 1, 2)]
    damaged = {
        "truncated": [*lines[:2], lines[2][:10]],  # a kill while the line was appended
        "missing": lines[:2],  # a kill between the commit and the append
        "uncommitted": [*lines, json.dumps({"round": 3})],  # round_0003 was removed
        "duplicated": [lines[0], *lines],  # older fedit: round 0 again after a crash
    }[damage]
    (tmp_path / "metrics.jsonl").write_text("".join(line + "\n" for line in damaged))
    rebuild_metrics(tmp_path, [1, 2])
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(line + "\n" for line in lines)


def test_rebuild_metrics_keeps_lines_of_rounds_without_a_record(tmp_path: Path) -> None:
    # a run directory written by an older fedit: metrics.jsonl only, one line cut short
    old = [json.dumps({"round": r}) for r in (0, 1)]
    (tmp_path / "round_0001").mkdir()
    (tmp_path / "metrics.jsonl").write_text(old[0] + "\n" + old[1] + "\n" + '{"rou')
    new = record(tmp_path, 2)
    rebuild_metrics(tmp_path, [1, 2])
    assert (tmp_path / "metrics.jsonl").read_text() == f"{old[0]}\n{old[1]}\n{new}\n"


def test_write_atomic_on_a_full_disk_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.toml"
    path.write_text("old")

    def full(source, target):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="the file is as it was before") as raised:
        write_atomic(path, "new")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]
    assert path.read_text() == "old"


# ---------------------------------------------------------------------------- input fingerprints


def fingerprinted_run(tmp_path: Path, *extra: str) -> tuple[Path, object]:
    """A run dir prepared (config, input fingerprints) for a config reading a data file, a
    held-out file and a model directory of fake weights; (run dir, config)."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "q", "response": "a"}\n')
    (tmp_path / "heldout.jsonl").write_text('{"instruction": "h", "response": "b"}\n')
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (model / "README.md").write_text("notes")
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.path={data}",
            f"data.heldout_path={tmp_path / 'heldout.jsonl'}",
            f"model.name_or_path={model}",
            *extra,
        ],
    )
    run_dir.prepare_run_dir(tmp_path / "run", cfg, [])
    return tmp_path / "run", cfg


def test_resume_with_unchanged_inputs_is_accepted(tmp_path: Path) -> None:
    out, cfg = fingerprinted_run(tmp_path)
    assert (out / run_dir.INPUTS).is_file()
    os.utime(tmp_path / "model" / "model.safetensors", (0, 0))  # a copy's new mtime: no change
    (tmp_path / "model" / "README.md").write_text("other notes")  # not the model
    run_dir.check_resume(out, cfg, [1])


@pytest.mark.parametrize(
    ("changed", "key"),
    [
        ("data.jsonl", "data.path"),
        ("heldout.jsonl", "data.heldout_path"),
        ("model/model.safetensors", "model.name_or_path"),
        ("model/config.json", "model.name_or_path"),
    ],
)
def test_resume_refuses_a_changed_input_file_naming_it(
    tmp_path: Path, changed: str, key: str
) -> None:
    out, cfg = fingerprinted_run(tmp_path)
    path = tmp_path / changed
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 1  # one bit, same size
    path.write_bytes(bytes(content))
    with pytest.raises(ConfigError) as raised:
        run_dir.check_resume(out, cfg, [1])
    message = str(raised.value)
    assert f"cannot resume {out}: {key}: {path} changed" in message
    assert "\n" not in message


def test_resume_refuses_a_file_gone_from_or_added_to_the_model(tmp_path: Path) -> None:
    out, cfg = fingerprinted_run(tmp_path)
    (tmp_path / "model" / "model-00002.safetensors").write_bytes(b"more weights")
    with pytest.raises(ConfigError, match=r"model-00002\.safetensors .*added"):
        run_dir.check_resume(out, cfg, [1])


def test_large_weights_are_fingerprinted_by_samples_that_see_a_changed_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fingerprint, "FULL_HASH_LIMIT", 1024)
    path = tmp_path / "big.safetensors"
    path.write_bytes(os.urandom(1 << 20))
    before = fingerprint.sampled_fingerprint(path)
    assert before.startswith("sampled:") and before == fingerprint.sampled_fingerprint(path)
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 1  # the middle is sampled
    path.write_bytes(bytes(content))
    assert fingerprint.sampled_fingerprint(path) != before
    path.write_bytes(bytes(content) + b"x")  # the size is part of it
    assert fingerprint.sampled_fingerprint(path) != before


def test_resume_of_a_run_dir_without_fingerprints_warns_and_records_them(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, cfg = fingerprinted_run(tmp_path)
    (out / run_dir.INPUTS).unlink()  # as an older fedit left it
    run_dir.check_resume(out, cfg, [1])
    assert "no input fingerprints" in capsys.readouterr().err
    run_dir.prepare_run_dir(out, cfg, [1])
    assert (out / run_dir.INPUTS).is_file()


def test_synthetic_data_needs_no_file_fingerprint(tmp_path: Path) -> None:
    out, cfg = fingerprinted_run(tmp_path, "data.path=synthetic")
    saved = json.loads((out / run_dir.INPUTS).read_text())
    assert saved["data.path"] == {}  # its generator's parameters are in the config
    run_dir.check_resume(out, cfg, [1])


def test_data_files_are_hashed_whole_whatever_their_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fingerprint, "FULL_HASH_LIMIT", 16)  # every file here is "large"
    _, cfg = fingerprinted_run(tmp_path)
    found = run_dir.input_fingerprints(cfg)
    assert all(v.startswith("sha256:") for v in found["data.path"].values())
    weights = str(tmp_path / "model" / "model.safetensors")
    assert found["model.name_or_path"][weights].startswith("sampled:")
