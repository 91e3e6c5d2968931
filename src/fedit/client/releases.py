"""Local DP's releases, kept by the client that made them: at most one per (run, round).

A round is asked for again on honest paths: a round that stopped with too few valid
replies, or a run resumed after a crash, trains the same clients for the same round. A
client that trained and noised afresh each time would release its delta again under new
noise, and k releases averaged leave noise σC/√k where the accountant counted σC. So a
client keeps each release it made (the noised delta clip(Δ) + N(0, σ²C²), and the scalars
sent with it) on its own disk, and a repeated request for that round gets the same
release back, added to the global adapter it is sent (the server knows that adapter, so
this is post-processing of the one release). The ledger counts every release made; the
newest KEPT_RELEASES are kept, and a request for an older round (a run rolled back further
than a round) is a new release, counted as one.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors import safe_open

from fedit.client.store import round_file, save_round, saved_rounds
from fedit.config import RunConfig
from fedit.errors import write_atomic
from fedit.ops.aggregation import add_scaled
from fedit.types import AdapterState, ClientUpdate

RELEASES_DIR = "local_dp_releases"  # under the run directory (simulation) or an owner's state dir
LEDGER = "released.json"  # [round numbers, one entry per release made]
KEPT_RELEASES = 2
SCALARS = ("num_examples", "num_steps", "learning_rate", "metrics")


class Releases:
    """One client's local DP releases, round_NNNN.safetensors under `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def load(
        self, round_number: int, global_state: AdapterState, client_id: int
    ) -> ClientUpdate | None:
        """The update this client released for `round_number`, on `global_state`, or None
        when it made none (or no longer holds it)."""
        path = self._path(round_number)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            release = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
            scalars = json.loads(f.metadata()["update"])
        shapes = {k: tuple(v.shape) for k, v in global_state.items()}
        if {k: tuple(v.shape) for k, v in release.items()} != shapes:
            raise ValueError(f"{path}: its tensors are not this adapter's; delete the file")
        state = add_scaled(global_state, release, 1.0)
        return ClientUpdate(client_id=client_id, state=state, **scalars)

    def save(self, round_number: int, release: AdapterState, update: ClientUpdate) -> None:
        """Count, then keep, the release of `round_number` (counted first: a crash between
        the two counts a release that was never sent, never the reverse)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        ledger = [*self.released(), round_number]
        write_atomic(self.directory / LEDGER, json.dumps(ledger))
        scalars = {k: v for k, v in asdict(update).items() if k in SCALARS}
        save_round(self._path(round_number), release, {"update": json.dumps(scalars)})
        for old in saved_rounds(self.directory)[:-KEPT_RELEASES]:
            self._path(old).unlink(missing_ok=True)

    def released(self) -> list[int]:
        """The rounds of every release made, one entry each."""
        path = self.directory / LEDGER
        return json.loads(path.read_text()) if path.is_file() else []

    def _path(self, round_number: int) -> Path:
        return round_file(self.directory, round_number)


def local_releases(cfg: RunConfig, client_id: int, root: Path) -> Releases | None:
    """Client `client_id`'s releases under `root`/client_<id> (None: no local DP)."""
    if cfg.privacy.mode != "local":
        return None
    return Releases(root / f"client_{client_id}")
