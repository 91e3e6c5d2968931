"""Bad input through the CLI: exit code 2 and one line naming the file, line, key or field.

One row per kind of bad input, run in-process on the tiny model. Rows refused at config
validation also check that nothing was loaded first; the two rows with exit code 0 are
inputs that must work (user text that looks like markup) or warn (an emptied held-out set).
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from typer.testing import CliRunner

import fedit.client.session
import fedit.engine.assembly
import fedit.engine.checkpoint
import fedit.engine.simulation
from fedit.cli.main import app
from tests.conftest import tiny_run_overrides

runner = CliRunner()
LONG = {"instruction": "x" * 400, "context": "", "response": "y", "category": "c"}
SHORT = {"instruction": "hi", "context": "", "response": "ok", "category": "c"}
NO_SPACE = os.strerror(errno.ENOSPC)
LOADING = ("load_tokenizer", "prepare_data")  # what a config-time refusal never reaches
# where each is looked up (load_tokenizer, load_model: fedit.engine.assembly's)
NEVER_IN = {"train_client": fedit.client.session, "prepare_data": fedit.engine.simulation}


def train(model_dir: Path, tmp: Path, *raw: str, **extra: object) -> list[str]:
    """`fedit train` on the tiny model with overrides (raw ones as given, e.g. 'key=')."""
    overrides = [*tiny_run_overrides(model_dir, tmp / "run", **extra), *raw]
    return ["train", "--quiet", *[a for o in overrides for a in ("--set", o)]]


def base_sets(model_dir: Path) -> list[str]:
    return ["--set", f"model.name_or_path={model_dir}", "--set", "data.path=synthetic"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def not_utf8_data(model_dir: Path, tmp: Path) -> list[str]:
    good = json.dumps(SHORT).encode() + b"\n"
    (tmp / "bad.jsonl").write_bytes(good + good + b'{"inst\xffruction": "x"}\n')
    return train(model_dir, tmp, **{"data.path": str(tmp / "bad.jsonl")})


def not_utf8_config(model_dir: Path, tmp: Path) -> list[str]:
    (tmp / "bad.toml").write_bytes(b"seed = 1\n# caf\xe9\n")
    return ["train", "-c", str(tmp / "bad.toml")]


def output_dir_under_a_file(model_dir: Path, tmp: Path) -> list[str]:
    (tmp / "afile").write_text("")
    return train(model_dir, tmp, f"output_dir={json.dumps(str(tmp / 'afile' / 'run'))}")


def export_onto_a_file(model_dir: Path, tmp: Path) -> list[str]:
    adapter = tmp / "round_0001"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_text("")
    (tmp / "afile").write_text("")
    return ["export", "--adapter", str(adapter), "--out", str(tmp / "afile")]


def partition_of_markup_category(model_dir: Path, tmp: Path) -> list[str]:
    rows = [{**SHORT, "instruction": f"say {i}", "category": "[/b]"} for i in range(5)]
    data = write_jsonl(tmp / "d.jsonl", rows)
    sets = [f"data.path={data}", "partition.num_clients=2", "data.heldout_per_category=1"]
    return ["partition", "--out", str(tmp / "parts"), *[a for o in sets for a in ("--set", o)]]


def client_emptied_by_max_seq_len(model_dir: Path, tmp: Path) -> list[str]:
    write_jsonl(tmp / "client_0.jsonl", [SHORT] * 3)
    write_jsonl(tmp / "client_1.jsonl", [LONG] * 3)
    extra = {
        "data.path": str(tmp / "client_*.jsonl"),
        "partition.method": "files",
        "partition.num_clients": 2,
        "data.max_seq_len": 160,
        "data.heldout_per_category": 0,  # a held-out split would take both clients' prompts
    }
    return train(model_dir, tmp, **extra)


def heldout_emptied_by_max_seq_len(model_dir: Path, tmp: Path) -> list[str]:
    heldout = write_jsonl(tmp / "heldout.jsonl", [LONG, LONG])
    return train(model_dir, tmp, **{"data.heldout_path": str(heldout), "federation.rounds": 1})


def eval_of_no_records(model_dir: Path, tmp: Path) -> list[str]:
    records = write_jsonl(tmp / "long.jsonl", [LONG, LONG])
    return ["eval", *base_sets(model_dir), "--data", str(records)]


def too_many_steps(model_dir: Path, tmp: Path) -> list[str]:
    extra = {
        "train.local_epochs": 1000,
        "train.micro_batch_size": 1,
        "train.grad_accum_steps": 1,
        "data.synthetic_per_skill": 200,
        "partition.num_clients": 1,
        "federation.clients_per_round": 1,
    }
    overrides = tiny_run_overrides(model_dir, tmp / "run", **extra)
    kept = [o for o in overrides if not o.startswith("train.max_steps=")]  # local_epochs counts
    return ["train", "--quiet", *[a for o in kept for a in ("--set", o)]]


def no_gpu(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def mkdir_denied(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if self == tmp / "run":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)


def disk_full(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    def save_file(tensors: object, filename: str, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, NO_SPACE, filename)

    monkeypatch.setattr(fedit.engine.checkpoint, "save_file", save_file)


def safetensors_disk_full(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    # what safetensors itself raises when a write fails (its OS error only in the text)
    def save_file(tensors: object, filename: str, *args: object, **kwargs: object) -> None:
        raise SafetensorError(
            f'Error while serializing: I/O error: {NO_SPACE} (os error 28) at path "{filename}"'
        )

    monkeypatch.setattr(fedit.engine.checkpoint, "save_file", save_file)


@dataclass(frozen=True)
class Case:
    args: Callable[[Path, Path], list[str]]  # (tiny model dir, tmp dir) -> CLI arguments
    expected: str  # "{tmp}" stands for the tmp dir; whitespace is ignored
    code: int = 2
    never: tuple[str, ...] = ()  # functions the run must not reach (see NEVER_IN)
    patch: Callable[[pytest.MonkeyPatch, Path], None] | None = None


CHECKPOINT = "{tmp}/run/round_0001"
CASES = {
    # A: tracebacks before
    "data-not-utf8": Case(
        not_utf8_data, "{tmp}/bad.jsonl:3: not valid UTF-8 (byte 0xff at column 7)"
    ),
    "config-not-utf8": Case(
        not_utf8_config, "{tmp}/bad.toml:2: not valid UTF-8 (byte 0xe9 at column 6)"
    ),
    "config-is-a-directory": Case(
        lambda m, t: ["train", "-c", str(t)], "{tmp}: is a directory, not a config file"
    ),
    "device-unknown": Case(
        lambda m, t: train(m, t, **{"model.device": "banana"}),
        "model.device: unknown device 'banana' (expected auto, cpu, cuda, cuda:N or mps)",
        never=LOADING,
    ),
    "device-absent": Case(
        lambda m, t: train(m, t, **{"model.device": "cuda:7"}),
        "model.device: 'cuda:7' is not available on this machine (available: cpu)",
        patch=no_gpu,
    ),
    "lora-target-unknown": Case(
        lambda m, t: train(m, t, **{"lora.target_modules": "q_proj,nope"}),
        "lora.target_modules: 'nope' matches no module of the model (its decoder Linear "
        "layers: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj; or use "
        "['all-linear'])",
    ),
    "model-path-absolute": Case(
        lambda m, t: train(m, t, **{"model.name_or_path": str(t / "no-model")}),
        "model.name_or_path: {tmp}/no-model not found: it is neither a directory nor a .gguf file",
    ),
    "model-path-relative": Case(
        lambda m, t: train(m, t, **{"model.name_or_path": "./no-such-model"}),
        "model.name_or_path: ./no-such-model not found: it is neither a directory nor a .gguf file",
    ),
    "output-dir-under-a-file": Case(output_dir_under_a_file, "{tmp}/afile/run: Not a directory"),
    "output-dir-permission-denied": Case(
        lambda m, t: train(m, t), "{tmp}/run: Permission denied", patch=mkdir_denied
    ),
    "disk-full-in-checkpoint": Case(
        lambda m, t: train(m, t), f"cannot write {CHECKPOINT}: {NO_SPACE}", patch=disk_full
    ),
    "disk-full-in-safetensors": Case(
        lambda m, t: train(m, t),
        f"cannot write {CHECKPOINT}: {NO_SPACE}",
        patch=safetensors_disk_full,
    ),
    "export-onto-a-file": Case(export_onto_a_file, "--out {tmp}/afile: is a file, not a directory"),
    "prompt-looks-like-markup": Case(
        lambda m, t: [
            "generate",
            *base_sets(m),
            "--set",
            "eval.max_new_tokens=2",
            "--prompt",
            "Close [/b]",
        ],
        "> Close [/b]",
        code=0,
    ),
    "category-looks-like-markup": Case(partition_of_markup_category, "[/b]", code=0),
    "strategy-unknown": Case(
        lambda m, t: train(m, t, **{"strategy.name": "fedavgg"}),
        "strategy.name: unknown strategy 'fedavgg' (known: fedadagrad, fedadam, fedavg, fedavgm, "
        "fedprox, fedyogi, scaffold)",
        never=LOADING,
    ),
    # B: misleading messages before
    "client-emptied-by-max-seq-len": Case(
        client_emptied_by_max_seq_len,
        "client 1: all 3 records dropped: prompt fills data.max_seq_len = 160 before any "
        "response token; raise data.max_seq_len",
    ),
    "eval-adapter-missing": Case(
        lambda m, t: ["eval", "--adapter", str(t / "nope")], "adapter not found: {tmp}/nope"
    ),
    "export-adapter-missing": Case(
        lambda m, t: ["export", "--adapter", str(t / "nope"), "--out", str(t / "x")],
        "adapter not found: {tmp}/nope",
    ),
    "heldout-emptied-by-max-seq-len": Case(
        heldout_emptied_by_max_seq_len,
        "warning: held-out set: all 2 records dropped: prompt fills data.max_seq_len = 384 "
        "before any response token; raise data.max_seq_len; no held-out loss will be reported",
        code=0,
    ),
    "eval-of-no-records": Case(
        eval_of_no_records,
        "no records to score: all 2 records dropped: prompt fills data.max_seq_len = 256 "
        "before any response token; raise data.max_seq_len",
    ),
    # C: config values
    "learning-rate-inf": Case(
        lambda m, t: train(m, t, **{"train.learning_rate": float("inf")}),
        "train.learning_rate: must be a finite number, got inf",
        never=LOADING,
    ),
    "learning-rate-nan": Case(
        lambda m, t: train(m, t, **{"train.learning_rate": float("nan")}),
        "train.learning_rate: must be a finite number, got nan",
        never=LOADING,
    ),
    "local-epochs-huge": Case(
        lambda m, t: train(m, t, **{"train.local_epochs": 1e300}),
        "train.local_epochs: must be in (0, 1000]",
        never=LOADING,
    ),
    "steps-per-round-huge": Case(
        too_many_steps,
        "optimizer steps per round, more than 1000000; lower it or set train.max_steps",
        never=("load_model", "train_client"),
    ),
    "empty-value-for-a-required-key": Case(
        lambda m, t: train(m, t, "train.micro_batch_size="),
        "train.micro_batch_size: must not be empty (only optional keys can be unset)",
        never=LOADING,
    ),
}


def squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_gets_one_clear_line(
    case: Case, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in case.never:

        def reached(*args: object, _name: str = name, **kwargs: object) -> None:
            raise AssertionError(f"{_name} ran: the input should have been refused before")

        monkeypatch.setattr(NEVER_IN.get(name, fedit.engine.assembly), name, reached)
    args = case.args(tiny_model_dir, tmp_path)
    if case.patch is not None:
        case.patch(monkeypatch, tmp_path)
    result = runner.invoke(app, args)
    output = result.output
    assert result.exit_code == case.code, (output, result.exception)
    assert "Traceback" not in output
    expected = case.expected.replace("{tmp}", str(tmp_path))
    assert squeeze(output).count(squeeze(expected)) == 1, output  # said once
    if case.code == 2:
        assert output.count("error:") == 1, output
