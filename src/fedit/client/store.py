"""Tensors a client keeps on its own disk from one round to the next, by round.

Two kinds live here: the error-feedback memory of a compressed upload
(fedit.client.feedback) and, under FedSA-LoRA (fedit.ops.sharing), the client's
own B factors. Both follow the federation's accepted updates, not the client's own
training: each is saved under the round it was made in and read back under the round the
coordinator names (``ClientTask.feedback_round``: this client's last update the coordinator
accepted, 0 for none). So a round trained again after a crash, a reply that was lost, or a
new run with the same config all continue from what the accepted update was made with.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedit.ops.aggregation import zeros_like
from fedit.types import AdapterState

log = logging.getLogger("fedit.client")
VERSION_FILE = re.compile(r"round_(\d{4,})\.safetensors")


def round_file(directory: Path, round_number: int) -> Path:
    return directory / f"round_{round_number:04d}.safetensors"


def saved_rounds(directory: Path) -> list[int]:
    """The round numbers of the round_NNNN.safetensors files in `directory`, ascending."""
    return sorted(
        int(m.group(1)) for f in directory.iterdir() if (m := VERSION_FILE.fullmatch(f.name))
    )


def save_round(path: Path, tensors: AdapterState, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to `path` atomically (a crash leaves no partial file under its name)."""
    partial = path.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata=metadata)
    os.replace(partial, path)


class RoundStore:
    """One client's tensors of one kind (`what`, for messages): round_NNNN.safetensors."""

    def __init__(self, directory: Path, what: str) -> None:
        self.directory, self.what = directory, what

    def load(self, round_number: int, like: AdapterState) -> AdapterState:
        """The tensors saved in `round_number` (0, or a file this disk lacks: zeros, what a
        client that has sent nothing yet holds: no memory, LoRA's B = 0)."""
        if round_number == 0:
            return zeros_like(like)
        path = self._path(round_number)
        if not path.exists():
            log.warning("%s: no %s here; starting from zeros", path, self.what)
            return self.load(0, like)
        saved = load_file(str(path))
        if {k: tuple(v.shape) for k, v in saved.items()} != {
            k: tuple(v.shape) for k, v in like.items()
        }:
            raise ValueError(f"{path}: its tensors are not this adapter's; delete the file")
        return saved

    def has(self, round_number: int) -> bool:
        """Whether this disk holds the tensors of `round_number` (0: nothing to hold)."""
        return round_number == 0 or self._path(round_number).exists()

    def save(self, round_number: int, tensors: AdapterState, named: int) -> None:
        """Write the tensors of `round_number` atomically, then drop every other round's but
        the one this round started from (`named`): a coordinator names only the round of
        the last update it accepted, and a round it did not accept is trained again (and
        saved again) before it can accept it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        save_round(self._path(round_number), tensors)
        for old in saved_rounds(self.directory):
            if old not in (named, round_number):
                self._path(old).unlink(missing_ok=True)

    def _path(self, round_number: int) -> Path:
        return round_file(self.directory, round_number)
