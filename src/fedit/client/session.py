"""One data owner's side of a federation, the same in every engine.

A ``LocalClient`` holds what never leaves its owner: the tokenised records (a simulation's
on disk until the client trains, fedit.data.token_store) and preference pairs, and the
fixed DPO reference log-probs once computed. Given the global adapter and a
``ClientTask`` it trains one local round and returns the update to send. The simulation
keeps one per client beside a shared model; a deployment keeps one per data-owner process.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedit.attacks.model import ModelAttack, attack_update
from fedit.client.dpo_trainer import reference_logps, train_client_dpo
from fedit.client.feedback import UploadCompressor
from fedit.client.hooks import make_hook
from fedit.client.own_factors import OwnFactors
from fedit.client.releases import Releases
from fedit.client.trainer import NonFiniteTrainingError, train_client
from fedit.config import DPOConfig, TrainConfig
from fedit.data.preferences import TokenizedPair
from fedit.data.tokenize import TokenizedExample
from fedit.models.adapters import set_adapter_state
from fedit.ops.ranks import global_at
from fedit.privacy import PrivacyPlan
from fedit.privacy.mechanism import local_release, released_update
from fedit.seeding import Stream
from fedit.types import AdapterState, ClientTask, ClientUpdate, Rejection


class LocalClient:
    """A client's data and its local round: ``train`` = load x, build the hook the
    strategy asked for, run the SFT or DPO trainer on its own records or pairs, and, with
    local differential privacy (``privacy.mode = "local"``), clip its delta and add the
    noise before anything leaves (fedit.privacy.mechanism.local_release), once per round:
    ``releases`` (fedit.client.releases.local_releases's) keeps what it released, and a
    round asked for again gets that release back. ``privacy`` is
    fedit.privacy.client_plan's answer (None: no local DP), ``attack`` is
    fedit.attacks.model.client_attack's (None: an honest client, the default of every
    run), ``compressor`` fedit.client.feedback.client_compressor's (None: float32
    uploads), all required so that no engine can build a client that forgets them.
    ``own`` (fedit.client.own_factors.own_factors's; None unless lora.shared = "A") holds
    the B factors it keeps under FedSA-LoRA. ``rank`` (fedit.ops.ranks.client_ranks)
    truncates the global adapter it trains from to its first r_k components; everything
    after works from that truncated x."""

    def __init__(
        self,
        client_id: int,
        examples: Sequence[TokenizedExample],
        pairs: Sequence[TokenizedPair],
        pad_id: int,
        dpo: DPOConfig,
        *,
        privacy: PrivacyPlan | None,
        attack: ModelAttack | None,
        compressor: UploadCompressor | None,
        own: OwnFactors | None,
        rank: int | None = None,
        releases: Releases | None = None,
    ) -> None:
        self.client_id = client_id
        if privacy is not None and privacy.mode != "local":
            raise ValueError(f"a client adds noise in local mode only, not {privacy.mode!r}")
        if (privacy is None) != (releases is None):
            raise ValueError("local DP needs a client's releases kept, and only local DP")
        self.privacy, self.releases = privacy, releases
        self.attack, self.compressor = attack, compressor
        self.own = own
        self.rank = rank  # mixed LoRA ranks: this client's r_k (None: the global rank)
        self.examples, self.pairs = examples, pairs
        self.pad_id, self.dpo = pad_id, dpo
        self.reference: Tensor | None = None  # fixed π_ref log-probs, "base" or "sft"

    def compute_reference(self, model: torch.nn.Module, train_cfg: TrainConfig) -> None:
        """Fix the (N, 2) DPO reference log-probs of this client's pairs from `model` as it is
        now (its adapter disabled for dpo.reference = "base"), at the training precision."""
        indices = range(len(self.pairs))
        self.reference = reference_logps(
            model, self.pairs, indices, train_cfg, self.dpo, self.pad_id
        )

    def train(
        self,
        model: torch.nn.Module,
        global_state: AdapterState,
        task: ClientTask,
        train_cfg: TrainConfig,
        show_progress: bool = False,
    ) -> ClientUpdate | Rejection:
        """One local round from the global adapter; a Rejection (left out of the aggregate)
        if the loss or the gradients went non-finite. Local DP privatises the update: its
        adapter is then x + clip(y − x) + noise; its metrics and record count are sent as
        they are (they are outside the guarantee). A round this client released already is
        not trained again: it gets the same release back (fedit.client.releases). A
        malicious client (``attack``) then replaces the adapter by its attack's
        (fedit.attacks.model.attack_update): last, after local DP, because the attacker
        controls what it sends and would not add the noise honestly, so Δ is the delta
        local DP left (the trained one without it). A
        compressed upload encodes last what the client sends (fedit.compression). Under
        FedSA-LoRA (``own``) it trains from its own B factors and keeps the trained ones,
        first, so that all after sees the shared factors only."""
        global_state = global_at(global_state, self.rank)
        update = self._released(global_state, task)
        if update is None:
            update = self._train(model, global_state, task, train_cfg, show_progress)
            if isinstance(update, Rejection):
                return update
        if self.attack is not None:
            seed = self.attack.seed(task.round_number - 1, self.client_id)
            update = attack_update(update, global_state, self.attack.config, seed)
        if self.compressor is not None:
            update = self.compressor.apply(update, global_state, task, self.rank)
        return update

    def _released(self, global_state: AdapterState, task: ClientTask) -> ClientUpdate | None:
        """Local DP: this round's release if this client made it already (see
        fedit.client.releases), else None."""
        if self.releases is None:
            return None
        return self.releases.load(task.round_number, global_state, self.client_id)

    def _train(
        self,
        model: torch.nn.Module,
        global_state: AdapterState,
        task: ClientTask,
        train_cfg: TrainConfig,
        show_progress: bool,
    ) -> ClientUpdate | Rejection:
        """Train from the global adapter (or FedSA-LoRA's own start); local DP's release of
        the trained delta, kept before it is sent."""
        start = global_state if self.own is None else self.own.start(global_state, task)
        set_adapter_state(model, start)
        common = {
            "client_id": self.client_id,
            "learning_rate": task.learning_rate,
            "seed": task.seed,
            "pad_id": self.pad_id,
            "hook": make_hook(task.instructions),
            "show_progress": show_progress,
        }
        try:
            if task.objective == "dpo":
                update = train_client_dpo(
                    model, self.pairs, train_cfg, self.dpo, reference=self.reference, **common
                )
            else:
                update = train_client(model, self.examples, train_cfg, **common)
        except NonFiniteTrainingError as err:
            return Rejection(self.client_id, err.reason)
        if self.own is not None:
            update = self.own.keep(update, global_state, task)
        if self.privacy is not None and self.releases is not None:
            plan = self.privacy
            seed = plan.noise_seed(Stream.LOCAL_NOISE, task.round_number - 1, self.client_id)
            release = local_release(update, global_state, plan.clip_norm, plan.noise_std, seed)
            self.releases.save(task.round_number, release, update)
            update = released_update(update, global_state, release)
        return update
