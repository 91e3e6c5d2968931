"""FedSA-LoRA on the client: the B factors it keeps to itself (fedit.ops.sharing).

A client of a ``lora.shared = "A"`` run trains from (Ā, B_k): the global A factors and its
own B factors of the last round the coordinator accepted from it (B = 0 before its first).
It saves the B_k it trained under this round on its own disk, and sends its A factors
beside the global adapter's B, so its update's Δ is zero outside A: local DP's clip, a
norm bound and every strategy then see the shared factors only.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from fedit.client.store import RoundStore
from fedit.config import RunConfig
from fedit.ops.sharing import kept_part, with_kept
from fedit.types import AdapterState, ClientTask, ClientUpdate

OWN_FACTORS_DIR = "own_factors"  # under the run directory (simulation) or an owner's state dir


class OwnFactors:
    """One client's kept factors (`shared`: lora.shared, not "all") in `store`."""

    def __init__(self, store: RoundStore, shared: str) -> None:
        if shared == "all":
            raise ValueError("lora.shared = 'all': a client keeps no factors of its own")
        self.store, self.shared = store, shared

    def start(self, global_state: AdapterState, task: ClientTask) -> AdapterState:
        """(Ā, B_k): the adapter this client's round trains from."""
        return self.load(task.feedback_round, global_state)

    def keep(
        self, update: ClientUpdate, global_state: AdapterState, task: ClientTask
    ) -> ClientUpdate:
        """Save the trained B_k under this round; the update to send has Ā's B instead."""
        trained = kept_part(update.state, self.shared)
        self.store.save(task.round_number, trained, named=task.feedback_round)
        return replace(update, state=with_kept(update.state, global_state, self.shared))

    def load(self, round_number: int, like: AdapterState) -> AdapterState:
        """This client's adapter as of `round_number`: `like`'s shared factors (the global
        adapter's), its own kept ones saved in that round."""
        return {**like, **self.store.load(round_number, kept_part(like, self.shared))}


def own_factors(cfg: RunConfig, client_id: int, root: Path) -> OwnFactors | None:
    """Client `client_id`'s kept factors under `root`/client_<id> (None: it keeps none)."""
    if cfg.lora.shared == "all":
        return None
    store = RoundStore(root / f"client_{client_id}", "kept LoRA factors")
    return OwnFactors(store, cfg.lora.shared)
