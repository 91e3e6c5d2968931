"""A run's pieces, built the same way by every engine: the tokenizer, the data, the base
model with the run's LoRA adapter, the clients (fedit.client.session.LocalClient) and their
fixed DPO reference.

The simulation (fedit.engine.simulation), a deployment's coordinator and data owners
(fedit.deploy.coordinator, fedit.deploy.owner) and both sides of the Ray runtime
(fedit.deploy.simulation_runtime) start a run here, so what they build, and in what order,
is written once: the data is prepared before the model is loaded (bad input is refused
before the expensive part), and the adapter's A factors are drawn from cfg.seed when the
model is wrapped (fedit.models.adapters.attach_lora), so every engine starts from the same
adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from fedit.attacks.model import client_attack
from fedit.client.feedback import FEEDBACK_DIR, client_compressor
from fedit.client.own_factors import OWN_FACTORS_DIR, own_factors
from fedit.client.releases import RELEASES_DIR, local_releases
from fedit.client.session import LocalClient
from fedit.config import DPOConfig, RunConfig, TrainConfig
from fedit.data.preferences import TokenizedPair, read_preferences
from fedit.data.readers import read_records
from fedit.data.tokenize import TokenizedExample
from fedit.engine.federation_data import FederationData, tokenize_heldout, tokenize_pairs_for
from fedit.engine.heldout import HeldOutSet
from fedit.models.adapters import attach_lora, require_full_precision_base, set_adapter_state
from fedit.models.loading import load_model, load_tokenizer
from fedit.ops.ranks import client_ranks
from fedit.privacy import client_plan
from fedit.types import AdapterState

D = TypeVar("D")
# One client's data: its id, its tokenised records and its tokenised preference pairs.
ClientData = tuple[int, Sequence[TokenizedExample], Sequence[TokenizedPair]]


@dataclass
class RunParts(Generic[D]):
    """What every engine builds before its first round: the tokenizer, the data its
    `prepare` made of the run's files, and the base model with the run's LoRA adapter."""

    tokenizer: Any
    data: D
    model: torch.nn.Module

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


def assemble(
    cfg: RunConfig,
    prepare: Callable[[RunConfig, Any], D] | None = None,
    threads: int | None = None,
) -> RunParts[D]:
    """The run's tokenizer, its data (`prepare`'s, from the config and the tokenizer; None
    without one) and its model, with `threads` torch threads (None: torch's default)."""
    if threads:
        torch.set_num_threads(threads)
    tokenizer = load_tokenizer(cfg.model)
    data = None if prepare is None else prepare(cfg, tokenizer)
    model = attach_lora(load_model(cfg.model), cfg.lora, cfg.seed)
    if cfg.strategy.lora_aggregation == "exact":  # "auto" may have resolved to half
        require_full_precision_base(model)
    return RunParts(tokenizer, data, model)  # type: ignore[arg-type]


def heldout_files(cfg: RunConfig, tokenizer: Any) -> HeldOutSet:
    """data.heldout_path and data.heldout_preference_path (either may be unset): what a
    coordinator, which holds no client's data, evaluates on."""
    examples: list[TokenizedExample] = []
    pairs: list[TokenizedPair] = []
    if cfg.data.heldout_path:
        records = read_records(cfg.data.heldout_path, cfg.data.fields)
        examples, _ = tokenize_heldout(cfg, tokenizer, records)
    if cfg.data.heldout_preference_path:
        data = cfg.data
        raw = read_preferences(
            data.heldout_preference_path, data.preference_format, fields=data.preference_fields
        )
        pairs, _ = tokenize_pairs_for(cfg, tokenizer, raw)
    return HeldOutSet(examples, pairs, tokenizer.pad_token_id)


def federation_heldout(data: FederationData, pad_id: int) -> HeldOutSet:
    """The held-out sets an in-process engine (the simulation, the Ray runtime's
    coordinator) set aside from the run's data."""
    return HeldOutSet(data.heldout, data.heldout_pairs, pad_id)


def in_process_clients(cfg: RunConfig, data: FederationData, pad_id: int) -> list[LocalClient]:
    """Every client of the federation `data` prepared in this process (the simulation's, a
    Ray worker's), their own state on one disk: the run directory."""
    clients = _every_client(data)
    return local_clients(cfg, data.num_clients, pad_id, Path(cfg.output_dir), clients)


def _every_client(data: FederationData) -> Iterator[ClientData]:
    """Each client's (id, records, pairs); an objective's data missing is an empty list."""
    for k in range(data.num_clients):
        examples = data.clients[k] if data.clients else []
        pairs = data.pair_clients[k] if data.pair_clients else []
        yield k, examples, pairs


def local_clients(
    cfg: RunConfig, num_clients: int, pad_id: int, root: Path, data: Iterable[ClientData]
) -> list[LocalClient]:
    """A LocalClient for each client of `data` (of the run's `num_clients`), with local
    DP's plan, its attack and its upload compressor; its error-feedback memories, kept
    factors and local DP releases under `root` (a simulation's run directory, one disk for
    every client; a data owner's state directory)."""
    privacy, ranks = client_plan(cfg, num_clients), client_ranks(cfg, num_clients)
    return [
        LocalClient(
            k,
            examples,
            pairs,
            pad_id,
            cfg.dpo,
            privacy=privacy,
            attack=client_attack(cfg, k, num_clients),
            compressor=client_compressor(cfg, k, root / FEEDBACK_DIR),
            own=own_factors(cfg, k, root / OWN_FACTORS_DIR),
            rank=None if ranks is None else ranks[k],
            releases=local_releases(cfg, k, root / RELEASES_DIR),
        )
        for k, examples, pairs in data
    ]


def reference_at_start(dpo: DPOConfig) -> bool:
    """π_ref is the starting model W0, known before any round: "base" (the adapter
    disabled), or "sft" of a run without SFT rounds (the starting adapter, B = 0)."""
    return dpo.reference == "base" or (dpo.reference == "sft" and dpo.sft_rounds == 0)


def reference_after_sft(dpo: DPOConfig) -> bool:
    """π_ref is the global model after dpo.sft_rounds SFT rounds: the global adapter of the
    first DPO round (round dpo.sft_rounds + 1), and round dpo.sft_rounds' checkpoint after."""
    return dpo.reference == "sft" and dpo.sft_rounds > 0


def fix_references(
    clients: Iterable[LocalClient],
    model: torch.nn.Module,
    train_cfg: TrainConfig,
    adapter: AdapterState | None = None,
) -> None:
    """Each client's fixed π_ref log-probs from `model` under `adapter` (None: the model as
    it is now)."""
    if adapter is not None:
        set_adapter_state(model, adapter)
    for client in clients:
        client.compute_reference(model, train_cfg)
