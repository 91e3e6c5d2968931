"""The coordinator's held-out scoring: held-out loss per category and, on preference pairs,
DPO's preference accuracy and margin against the base model.

``HeldOutSet`` is what an engine hands the round loop; ``HeldOutScorer`` fixes the DPO
reference π_ref = W0 once, when it is built (before a resume folds any exact-aggregation
residual into the base), and scores the global adapter whenever the loop asks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedit.client.dpo import preference_scores
from fedit.client.dpo_trainer import pair_logps
from fedit.config import RunConfig
from fedit.data.preferences import TokenizedPair
from fedit.data.tokenize import TokenizedExample
from fedit.eval.loss import heldout_loss


@dataclass(frozen=True)
class HeldOutSet:
    """The coordinator's held-out records and pairs, tokenised (either may be empty)."""

    examples: Sequence[TokenizedExample] = ()
    pairs: Sequence[TokenizedPair] = ()
    pad_id: int = 0


class HeldOutScorer:
    """Scores `model`'s current adapter on `held_out`, as cfg.eval and cfg.dpo say."""

    def __init__(self, model: torch.nn.Module, held_out: HeldOutSet, cfg: RunConfig) -> None:
        self.model, self.held_out, self.cfg = model, held_out, cfg
        self.reference = self._base_logps()  # π_ref: the base model, whatever comes later

    def score(self) -> dict[str, Any]:
        """Held-out loss and preference scores per category, and how long they took (kept
        apart from training)."""
        examples, pairs = self.held_out.examples, self.held_out.pairs
        if (not examples and not pairs) or self.cfg.lora.shared != "all":
            return {}  # FedSA-LoRA: the global adapter (B = 0) is the base; fedit personalize
        started = time.perf_counter()
        record: dict[str, Any] = {}
        if examples:
            batch_size = self.cfg.eval.batch_size
            record["heldout"] = heldout_loss(self.model, examples, self.held_out.pad_id, batch_size)
        if pairs:
            categories = [p.category for p in pairs]
            record["heldout_dpo"] = preference_scores(
                self._logps(), self.reference, categories, self.cfg.dpo.beta
            )
        record["eval_seconds"] = time.perf_counter() - started
        return record

    def _logps(self) -> torch.Tensor:
        """(N, 2) log-probs of the held-out pairs in full precision, as heldout_loss computes."""
        pad_id, batch_size = self.held_out.pad_id, self.cfg.eval.batch_size
        return pair_logps(self.model, self.held_out.pairs, pad_id, batch_size=batch_size)

    def _base_logps(self) -> torch.Tensor | None:
        if not self.held_out.pairs:
            return None
        with self.model.disable_adapter():
            return self._logps()
