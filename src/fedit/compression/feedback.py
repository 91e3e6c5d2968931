"""A client's compressed upload with error feedback (Seide et al. 2014; Stich et al. 2018,
"Sparsified SGD with Memory"; Karimireddy et al. 2019, "Error Feedback Fixes SignSGD").

With a lossy codec Q the client sends Q(c) with c = Δ + e, e its memory of what earlier
rounds' encodings dropped, and keeps e ← c − decode(Q(c)). Nothing is lost for good: what
top-k leaves out this round is sent in a later one. The memory is the client's own and
never leaves its disk (``FeedbackStore``). It is saved under the round it was made in and
read back under the round the coordinator names (``ClientTask.feedback_round``: this
client's last update the coordinator accepted, 0 for none), so a round that is trained
again after a crash, a reply that was lost, or a new run with the same config all start
from the memory of the update that was actually aggregated.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedit.compression.codecs import decode_state, encode_state
from fedit.config import CompressionConfig, RunConfig
from fedit.server.aggregation import add_scaled, subtract, zeros_like
from fedit.server.ranks import grow, shrink
from fedit.types import AdapterState, ClientTask, ClientUpdate

log = logging.getLogger("fedit.compression")
FEEDBACK_DIR = "feedback"  # under the run directory (simulation) or an owner's state dir
VERSION_FILE = re.compile(r"round_(\d{4,})\.safetensors")


@dataclass(frozen=True)
class Compressed:
    """One upload: the parts sent, the delta they decode to, the memory kept."""

    parts: dict[str, torch.Tensor]  # fedit.compression.codecs.state_layout's
    sent: AdapterState  # decode(parts): what the server aggregates, bit for bit
    memory: AdapterState | None  # e for the next round (None without error feedback)


def compress(
    delta: AdapterState,
    codec: str,
    fraction: float,
    memory: AdapterState | None,
) -> Compressed:
    """Encode Δ (+ e with error feedback, `memory` not None) and the new memory."""
    carried = delta if memory is None else add_scaled(delta, memory, 1.0)
    parts = encode_state(codec, carried, fraction)
    shapes = {name: tuple(t.shape) for name, t in delta.items()}
    sent = decode_state(codec, parts, shapes, fraction)
    return Compressed(parts, sent, None if memory is None else subtract(carried, sent))


class FeedbackStore:
    """One client's error-feedback memories on its own disk: round_NNNN.safetensors."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def load(self, round_number: int, like: AdapterState) -> AdapterState:
        """The memory saved in `round_number` (0, or a file this disk lacks: zeros, the
        memory of a client that has sent nothing yet)."""
        if round_number == 0:
            return zeros_like(like)
        path = self._path(round_number)
        if not path.exists():
            log.warning("%s: no error-feedback memory here; starting from zeros", path)
            return self.load(0, like)
        memory = load_file(str(path))
        if {k: tuple(v.shape) for k, v in memory.items()} != {
            k: tuple(v.shape) for k, v in like.items()
        }:
            raise ValueError(f"{path}: its tensors are not this adapter's; delete the file")
        return memory

    def save(self, round_number: int, memory: AdapterState, named: int) -> None:
        """Write the memory of `round_number` atomically, then drop every other memory but
        the one this round started from (`named`): a coordinator names only the round of
        the last update it accepted, and a round it did not accept is trained again (and
        saved again) before it can accept it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(round_number)
        partial = path.with_suffix(".partial")
        save_file({k: v.contiguous() for k, v in memory.items()}, str(partial))
        os.replace(partial, path)
        versions = sorted(
            int(m.group(1))
            for f in self.directory.iterdir()
            if (m := VERSION_FILE.fullmatch(f.name))
        )
        for old in versions:
            if old not in (named, round_number):
                self._path(old).unlink(missing_ok=True)

    def _path(self, round_number: int) -> Path:
        return self.directory / f"round_{round_number:04d}.safetensors"


class UploadCompressor:
    """A client's compressed upload: the run's codec and, with error feedback, the store of
    its memories (required then: ``store`` None without it)."""

    def __init__(self, config: CompressionConfig, store: FeedbackStore | None) -> None:
        if config.upload == "none":
            raise ValueError("compression.upload = 'none' sends y_k as it is: no compressor")
        if config.memory != (store is not None):
            raise ValueError("an error-feedback memory store is needed exactly when it is on")
        self.config, self.store = config, store

    def apply(
        self,
        update: ClientUpdate,
        global_state: AdapterState,
        task: ClientTask,
        rank: int | None = None,
    ):
        """`update` as the coordinator will read it: y = x + decode(parts), the parts in
        ``encoded``; the memory of this round saved first. A client of LoRA rank `rank`
        encodes (and remembers) its own components only (fedit.server.ranks.shrink)."""
        shapes = {name: tuple(t.shape) for name, t in global_state.items()}
        delta = shrink(subtract(update.state, global_state), rank)
        memory = None
        if self.store is not None:
            memory = self.store.load(task.feedback_round, delta)
        packed = compress(delta, self.config.upload, self.config.topk_fraction, memory)
        if self.store is not None and packed.memory is not None:
            self.store.save(task.round_number, packed.memory, named=task.feedback_round)
        state = add_scaled(global_state, grow(packed.sent, shapes), 1.0)
        return replace(update, state=state, encoded=packed.parts)


def client_compressor(cfg: RunConfig, client_id: int, memory_root: Path) -> UploadCompressor | None:
    """Client `client_id`'s compressor (None: float32 uploads), its error-feedback memories
    under `memory_root`/client_<id> (the simulation's run directory, an owner's state dir)."""
    config = cfg.compression
    if config.upload == "none":
        return None
    store = FeedbackStore(memory_root / f"client_{client_id}") if config.memory else None
    return UploadCompressor(config, store)
