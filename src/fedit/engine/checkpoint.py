"""Per-round checkpoints: the global adapter (PEFT layout), server state, run state, config,
the round's metrics line and the per-client state the round changed.

Layout of a run directory::

    config.toml              resolved run config
    metrics.jsonl            one line per completed round (rebuilt from the records below)
    metrics_round0.json      round 0's line: the starting model (eval.at_start)
    round_0001/              one directory per completed round
      adapter_config.json    \\ standard PEFT layout:
      adapter_model.safetensors / PeftModel.from_pretrained(base, dir) loads it
      server_state.safetensors  strategy state (momentum, moments, control variates)
      base_residual.safetensors exact LoRA aggregation: what was folded into base weights
      client_state/<id>.safetensors  per-client server state this round changed (SCAFFOLD's
                             c_k with more than 64 clients): a client's newest file is its state
      metrics.json           the round's line of metrics.jsonl
      state.json             round counter, seed, strategy name
      config.toml            the config that produced it

A round directory is written under a temporary name and renamed when complete: the rename
commits the round, its metrics line and its clients' state at once, so a crash mid-write
never leaves a checkpoint that looks complete, nor damages an older one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedit.config import RunConfig
from fedit.errors import write_error
from fedit.models.adapters import (
    BASE_RESIDUAL,
    get_adapter_state,
    save_adapter,
    write_exact_loading_note,
)
from fedit.types import AdapterState

ROUND_PATTERN = re.compile(r"^round_(\d{4,})$")
CLIENT_STATE = "client_state"
METRICS_RECORD = "metrics.json"


def round_dir(output_dir: Path, round_number: int) -> Path:
    return output_dir / f"round_{round_number:04d}"


def metrics_record(output_dir: Path, round_number: int) -> Path:
    """The file holding round `round_number`'s metrics line (0: the starting model)."""
    if round_number == 0:
        return output_dir / "metrics_round0.json"
    return round_dir(output_dir, round_number) / METRICS_RECORD


def committed_records(output_dir: Path, done: list[int]) -> dict[int, dict[str, Any]]:
    """{round: its metrics line} of the committed rounds `done` that have a record (a round
    saved by an older fedit has none)."""
    records = {}
    for n in done:
        path = metrics_record(output_dir, n)
        if path.is_file():
            records[n] = json.loads(path.read_text())
    return records


def accepted_rounds(records: dict[int, dict[str, Any]]) -> dict[int, int]:
    """{client id: the last round of `records` (committed_records') that aggregated its
    update}."""
    return {
        client["id"]: n for n, record in sorted(records.items()) for client in record["clients"]
    }


def asked_clients(record: dict[str, Any]) -> set[int]:
    """Every client a round's metrics line names: aggregated, rejected or dropped, so every
    client the round asked to train."""
    left_out = record.get("rejected", []) + record.get("dropped", [])
    return {c["id"] for c in record["clients"]} | {r["client"] for r in left_out}


def completed_rounds(output_dir: Path) -> list[int]:
    if not output_dir.is_dir():
        return []
    found = (ROUND_PATTERN.match(p.name) for p in output_dir.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


@dataclass
class Checkpoint:
    round_number: int  # rounds completed
    global_state: AdapterState
    server_state: dict[str, torch.Tensor]
    base_residual: dict[str, torch.Tensor]
    run_state: dict[str, Any]
    metrics: str = ""  # the round's metrics.jsonl line
    client_state: dict[int, AdapterState] = field(default_factory=dict)  # changed this round


def save_checkpoint(
    output_dir: Path,
    model: PeftModel,
    checkpoint: Checkpoint,
    cfg: RunConfig,
) -> Path:
    """Write one completed round atomically and return its directory.

    A failed write (disk full, ...) removes the staging directory and raises an OSError
    naming the round; the rounds before it stay as they were, so --resume continues.
    """
    final = round_dir(output_dir, checkpoint.round_number)
    staging = output_dir / f".tmp-{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_round(staging, model, checkpoint, cfg)
        os.replace(staging, final)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(staging, ignore_errors=True)
        consequence = "the rounds before it are saved and --resume continues after them"
        raise write_error(final, err, consequence) from err
    return final


def _write_round(staging: Path, model: PeftModel, checkpoint: Checkpoint, cfg: RunConfig) -> None:
    staging.mkdir(parents=True)
    save_adapter(model, checkpoint.global_state, staging)
    save_file(_contiguous(checkpoint.server_state), str(staging / "server_state.safetensors"))
    if checkpoint.base_residual:
        save_file(_contiguous(checkpoint.base_residual), str(staging / BASE_RESIDUAL))
        write_exact_loading_note(staging)  # plain PEFT would ignore the residual
    if checkpoint.client_state:
        (staging / CLIENT_STATE).mkdir()
    for client_id, state in sorted(checkpoint.client_state.items()):
        save_file(_contiguous(state), str(staging / CLIENT_STATE / f"{client_id}.safetensors"))
    (staging / METRICS_RECORD).write_text(checkpoint.metrics + "\n")
    (staging / "state.json").write_text(json.dumps(checkpoint.run_state, indent=2))
    cfg.save(staging / "config.toml")


class ClientStateStore:
    """Per-client server state kept on disk and committed with the round checkpoints.

    A client's state changes only in the rounds it takes part in, so each checkpoint holds
    the state of that round's clients only (``client_state/<id>.safetensors``: checkpoints
    do not grow with the number of clients), and a client's state after round r is its
    newest file in rounds <= r. New state waits in memory (``put``) until the round's
    checkpoint writes it (``pending``) and is committed (``commit``): a crash before the
    commit leaves every committed version as it was, so a resumed round starts from them.
    """

    def __init__(self, checkpoints: list[Path]) -> None:
        """`checkpoints`: the committed round directories to resume from, oldest first."""
        self._files: dict[int, Path] = {}
        self._pending: dict[int, AdapterState] = {}
        for directory in checkpoints:
            self._add(directory)

    def get(self, client_id: int) -> AdapterState | None:
        if client_id in self._pending:
            return self._pending[client_id]
        file = self._files.get(client_id)
        return load_file(str(file)) if file else None

    def put(self, client_id: int, state: AdapterState) -> None:
        self._pending[client_id] = state

    def pending(self) -> dict[int, AdapterState]:
        """State put since the last commit: for the round's checkpoint to write."""
        return dict(self._pending)

    def clear(self) -> None:
        """Forget every client's state, committed or not (Strategy.reset: at sft_then_dpo's
        switch the SFT rounds' state is not the DPO rounds')."""
        self._files.clear()
        self._pending.clear()

    def commit(self, directory: Path) -> None:
        """The checkpoint at `directory`, holding ``pending()``, is committed."""
        self._add(directory)
        self._pending.clear()

    def _add(self, directory: Path) -> None:
        for file in (directory / CLIENT_STATE).glob("*.safetensors"):
            self._files[int(file.stem)] = file


def load_global_adapter(model: PeftModel, directory: Path) -> AdapterState:
    """Read a PEFT-layout adapter into `model` and return it in fedit's naming."""
    weights = load_file(str(directory / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise KeyError(f"{directory}: adapter keys not in the model: {result.unexpected_keys[:3]}")
    return get_adapter_state(model)


def load_checkpoint(model: PeftModel, directory: Path, round_number: int) -> Checkpoint:
    residual_file = directory / BASE_RESIDUAL
    return Checkpoint(
        round_number=round_number,
        global_state=load_global_adapter(model, directory),
        server_state=load_file(str(directory / "server_state.safetensors")),
        base_residual=load_file(str(residual_file)) if residual_file.exists() else {},
        run_state=json.loads((directory / "state.json").read_text()),
    )


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
