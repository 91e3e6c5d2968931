"""What a round's messages carry and weigh, the same for both engines (design §2.8).

The deployment sends exactly `task_content` to each owner and receives `encode_reply`'s
content back; the simulation builds the same contents for each client it trains in process
and reports their `wire.content_bytes`, so metrics.jsonl's bytes_down / bytes_up mean the
same thing whichever engine wrote them.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from flwr.app import RecordDict

from fedit.config import RunConfig, to_toml
from fedit.models.loading import base_fingerprint
from fedit.ops.ranks import shrink
from fedit.ops.sharing import shared_part
from fedit.protocol import wire
from fedit.types import AdapterState, ClientTask, ClientUpdate, Rejection

# Per-client tensor groups the owner keeps itself (design §2.6): sent by digest, not in full.
HELD_BY_OWNER = ("c_k",)
# The SFT-end adapter, sent only to an owner that lost its dpo.reference = "sft" log-probs.
REFERENCE_GROUP = "reference"


def owners_config(cfg: RunConfig) -> str:
    """The run config sent to every owner: the coordinator's paths, machine settings and
    deployment blanked (each owner puts its own files in, picks its own threads), evaluation
    (the coordinator's job) left out, everything that shapes training kept. So the header,
    and with it the bytes a round sends, does not change with what a resume may change."""
    data = cfg.to_dict()
    data["output_dir"] = ""
    for key in ("path", "preference_path", "heldout_path", "heldout_preference_path"):
        data["data"][key] = ""
    data["train"].pop("threads", None)
    data["secagg"].pop("stage_timeout", None)  # the coordinator's waiting, not the owners
    data.pop("deploy", None)
    data.pop("eval", None)
    return to_toml(data)


def run_header(cfg: RunConfig, model: torch.nn.Module) -> wire.RunHeader:
    """The header every task of this run carries: the owners' config, the base model's id."""
    return wire.RunHeader.of(owners_config(cfg), base_fingerprint(model))


def task_content(
    task: ClientTask,
    global_state: AdapterState,
    header: wire.RunHeader,
    hold: bool = True,
    rank: int | None = None,
    shared: str = "all",
) -> RecordDict:
    """The task's message content; with `hold`, per-client state the owner keeps is named
    by digest instead of sent. Mixed LoRA ranks: the tensors at the client's `rank`.
    FedSA-LoRA (`shared`, lora.shared): the shared factors of the global adapter only."""
    tensors = task.instructions.tensors
    held = {g: wire.state_digest(tensors[g]) for g in HELD_BY_OWNER if hold and g in tensors}
    if rank is not None:
        groups = {g: shrink(t, rank) for g, t in tensors.items()}
        task = replace(task, instructions=replace(task.instructions, tensors=groups))
    sent = shared_part(shrink(global_state, rank), shared)
    return wire.encode_task(task, sent, header, held=held)


def reply_content(
    answer: ClientUpdate | Rejection, rank: int | None = None, shared: str = "all"
) -> RecordDict:
    """What an owner replies for a trained round (a non-finite one is a status); mixed
    LoRA ranks: its tensors at the client's `rank` (a compressed update's parts already
    are, fedit.client.feedback); FedSA-LoRA (`shared`): its shared factors only."""
    if isinstance(answer, Rejection):
        return wire.encode_status("non_finite", answer.reason)
    answer = replace(answer, state=shared_part(answer.state, shared))
    if rank is not None and answer.encoded is None:
        extras = {name: shrink(t, rank) for name, t in answer.extras.items()}
        answer = replace(answer, state=shrink(answer.state, rank), extras=extras)
    return wire.encode_reply(answer)


def round_trip_bytes(
    task: ClientTask,
    global_state: AdapterState,
    header: wire.RunHeader,
    answer: ClientUpdate | Rejection,
    rank: int | None = None,
    shared: str = "all",
) -> dict[str, int]:
    """bytes_down / bytes_up of one client's round had it crossed the wire (an owner that
    holds its c_k, as after its first round; a client of LoRA rank `rank`; lora.shared)."""
    down = task_content(task, global_state, header, rank=rank, shared=shared)
    return {
        "bytes_down": wire.content_bytes(down),
        "bytes_up": wire.content_bytes(reply_content(answer, rank, shared)),
    }
