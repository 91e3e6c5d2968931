"""A client's compressed upload with error feedback (Seide et al. 2014; Stich et al. 2018,
"Sparsified SGD with Memory"; Karimireddy et al. 2019, "Error Feedback Fixes SignSGD").

With a lossy codec Q the client sends Q(c) with c = Δ + e, e its memory of what earlier
rounds' encodings dropped, and keeps e ← c − decode(Q(c)). Nothing is lost for good: what
top-k leaves out this round is sent in a later one. The memory is the client's own and
never leaves its disk (fedit.client.store.RoundStore), which keeps it by round: a round
trained again after a crash, a reply that was lost, or a new run with the same config all
start from the memory of the update that was actually aggregated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fedit.client.store import RoundStore
from fedit.compression.codecs import decode_state, encode_state
from fedit.config import CompressionConfig, RunConfig
from fedit.ops.aggregation import add_scaled, subtract
from fedit.ops.ranks import grow, shrink
from fedit.types import AdapterState, ClientTask, ClientUpdate

FEEDBACK_DIR = "feedback"  # under the run directory (simulation) or an owner's state dir


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


class UploadCompressor:
    """A client's compressed upload: the run's codec and, with error feedback, the store of
    its memories (required then: ``store`` None without it)."""

    def __init__(self, config: CompressionConfig, store: RoundStore | None) -> None:
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
        encodes (and remembers) its own components only (fedit.ops.ranks.shrink)."""
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
    directory = memory_root / f"client_{client_id}"
    store = RoundStore(directory, "error-feedback memory") if config.memory else None
    return UploadCompressor(config, store)
