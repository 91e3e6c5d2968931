"""The local DPO round: fedit.client.trainer's loop with a preference loss.

A round is planned and stepped exactly as an SFT round (length-grouped batches from the
derived seed, micro-batches with accumulation, AdamW, the strategy's hooks, clipping,
mixed precision): only the forward and the loss differ. Each micro-batch runs its pairs'
chosen and rejected responses as one concatenated batch (``collate_pairs``), and the
reference model's log-probs of every pair the round uses are computed once, up front.
Batch sizes count pairs, so a micro-batch of 4 runs 8 sequences.

The reference needs no second model: ``dpo.reference = "base"`` is the same model with its
adapter disabled, ``"round_start"`` the adapter as the client received it (the global
adapter), ``"sft"`` the global model at the end of the SFT rounds. Each is fixed for the
whole round, so one extra no-grad forward per pair replaces the second model copy, and its
forward at every step, that a TRL DPOTrainer keeps. "round_start" is computed here each
round; "base" and "sft" are fixed for the whole run, so the engine computes them once
(see ``fedit.engine.simulation``) and passes them in as ``reference``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedit.client.batching import split_micro_batches
from fedit.client.dpo import dpo_loss
from fedit.client.hooks import ClientHook
from fedit.client.loss import row_loss_sums
from fedit.client.precision import autocast
from fedit.client.trainer import StepStats, plan_batches, run_optimizer_steps, steps_per_round
from fedit.config import DPOConfig, TrainConfig
from fedit.data.preferences import TokenizedPair, collate_pairs
from fedit.models.adapters import adapter_parameters, get_adapter_state
from fedit.types import ClientUpdate


def pair_lengths(pairs: Sequence[TokenizedPair]) -> list[int]:
    """The longer of a pair's two sequences: what batching plans and pads by."""
    return [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]


def _pair_batch(
    pairs: Sequence[TokenizedPair], indices: Sequence[int], pad_id: int, device: torch.device
) -> dict[str, Tensor]:
    batch = collate_pairs([pairs[i] for i in indices], pad_id)
    return {key: value.to(device) for key, value in batch.items()}


def _response_logps(
    model: torch.nn.Module, batch: dict[str, Tensor], logits_on_labels_only: bool
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of each row's response tokens, and their counts.

    The negated per-row cross-entropy of the SFT loss: the same LM-head-on-labels-only
    path, so a DPO step costs what an SFT step on twice the rows does.
    """
    sums, counts = row_loss_sums(model, batch, logits_on_labels_only)
    return -sums, counts


@torch.no_grad()
def pair_logps(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    pad_id: int,
    *,
    batch_size: int,
    indices: Sequence[int] | None = None,
    mixed_precision: str = "off",
    logits_on_labels_only: bool = True,
) -> Tensor:
    """(N, 2) summed response log-probs (chosen, rejected) of pairs under `model` as it is.

    Runs in eval mode (no dropout) and restores the model's mode. Only `indices` (default:
    all) are computed, in length order; the other rows are NaN.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.full((len(pairs), 2), float("nan"))
    wanted = range(len(pairs)) if indices is None else indices
    lengths = pair_lengths(pairs)
    order = sorted(wanted, key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = _pair_batch(pairs, chunk, pad_id, device)
        with autocast(model, mixed_precision):
            logps, _ = _response_logps(model, batch, logits_on_labels_only)
        out[chunk] = logps.float().cpu().view(2, len(chunk)).T
    model.train(was_training)
    return out


def reference_logps(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    indices: Sequence[int],
    cfg: TrainConfig,
    dpo: DPOConfig,
    pad_id: int,
) -> Tensor:
    """The reference model's (N, 2) log-probs of the pairs at `indices`, without a second model.

    "base": inside ``model.disable_adapter()`` the LoRA layers pass the base weights through
    (W0 as long as no exact-aggregation residual has been folded in, which is when the
    engine computes it); "round_start" and "sft": the adapter as loaded (the round's global
    adapter; for "sft" the caller loads the SFT-end model first). Computed under the
    training precision so that, with "round_start", the first step's policy and reference
    agree up to dropout (and, in bf16, up to the rounding of the padded batches each pass
    puts a pair in).
    """
    adapter_off = model.disable_adapter() if dpo.reference == "base" else contextlib.nullcontext()
    with adapter_off:
        return pair_logps(
            model,
            pairs,
            pad_id,
            batch_size=cfg.micro_batch_size,
            indices=indices,
            mixed_precision=cfg.mixed_precision,
            logits_on_labels_only=cfg.logits_on_labels_only,
        )


@dataclass
class DPOStats(StepStats):
    pairs: int = 0
    correct: float = 0.0  # pairs whose chosen reward beat the rejected one
    margin_sum: float = 0.0  # of chosen − rejected reward


def _accumulate(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    batch: list[int],
    lengths: Sequence[int],
    reference: Tensor,
    cfg: TrainConfig,
    dpo: DPOConfig,
    pad_id: int,
    hook: ClientHook,
    params: dict[str, torch.nn.Parameter],
    scaler: torch.amp.GradScaler,
    stats: DPOStats,
) -> Tensor:
    """Forward and backward over one optimizer batch; loss is the mean over its pairs.
    Returns the batch's loss as back-propagated (unscaled, detached)."""
    micro_batches = split_micro_batches(
        batch, lengths, cfg.micro_batch_size, cfg.max_tokens_per_forward, rows_per_item=2
    )
    device = next(iter(params.values())).device
    batch_loss = torch.zeros((), device=device)
    for micro in micro_batches:
        inputs = _pair_batch(pairs, micro, pad_id, device)
        with autocast(model, cfg.mixed_precision):
            policy, counts = _response_logps(model, inputs, cfg.logits_on_labels_only)
        n = len(micro)
        ref = reference[micro].to(device)
        out = dpo_loss(
            policy[:n],
            policy[n:],
            ref[:, 0],
            ref[:, 1],
            beta=dpo.beta,
            label_smoothing=dpo.label_smoothing,
            loss_type=dpo.loss_type,
        )
        loss = out.loss * (n / len(batch))
        extra = hook.loss_term(params)
        if extra is not None:
            loss = loss + extra / len(micro_batches)
        scaler.scale(loss).backward()
        batch_loss += loss.detach()
        stats.loss_sum += float(out.loss.detach()) * n
        stats.correct += float(out.accuracy) * n
        stats.margin_sum += float(out.margin) * n
        stats.pairs += n
        stats.label_tokens += int(counts.sum())
        stats.real_tokens += int(inputs["attention_mask"].sum())
        stats.computed_tokens += inputs["input_ids"].numel()
    return batch_loss


def train_client_dpo(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    cfg: TrainConfig,
    dpo: DPOConfig,
    *,
    client_id: int,
    learning_rate: float,
    seed: int,
    pad_id: int,
    hook: ClientHook | None = None,
    reference: Tensor | None = None,
    show_progress: bool = False,
) -> ClientUpdate:
    """Train the adapter currently in `model` on one client's preference pairs for one round.

    ``reference``: the (len(pairs), 2) reference log-probs, when the caller holds them (a
    reference fixed for the run); None computes ``dpo.reference`` here ("sft" cannot be:
    only the engine knows the SFT-end model).

    Metrics: "train_loss" is the mean DPO loss over the pairs stepped on, "dpo_accuracy" the
    share of them whose chosen reward was higher, "dpo_margin" the mean reward margin (both
    measured at the step that used the pair); "label_tokens" counts response tokens of both
    sides; "reference_seconds" is the reference pass (0 when ``reference`` is given).
    """
    hook = hook or ClientHook()
    params = adapter_parameters(model)
    num_steps = steps_per_round(len(pairs), cfg)
    lengths = pair_lengths(pairs)
    batches = plan_batches(lengths, cfg.batch_size, num_steps, seed, cfg.group_by_length)
    started = time.perf_counter()
    if reference is None:
        if dpo.reference == "sft":
            raise ValueError("dpo.reference = 'sft' needs the SFT-end model's log-probs")
        # Only the pairs this round's plan steps on (all of them once local_epochs >= 1).
        used = sorted({i for batch in batches for i in batch})
        reference = reference_logps(model, pairs, used, cfg, dpo, pad_id)
    elif reference.shape != (len(pairs), 2):
        raise ValueError(f"reference {tuple(reference.shape)} does not match {len(pairs)} pairs")
    reference_seconds = time.perf_counter() - started
    torch.manual_seed(seed)  # LoRA dropout draws from the global generator
    stats = DPOStats()

    def accumulate(batch: list[int], scaler: torch.amp.GradScaler) -> Tensor:
        return _accumulate(
            model, pairs, batch, lengths, reference, cfg, dpo, pad_id, hook, params, scaler, stats
        )

    run_optimizer_steps(
        model,
        batches,
        cfg,
        params=params,
        learning_rate=learning_rate,
        hook=hook,
        accumulate=accumulate,
        client_id=client_id,
        stats=stats,
        desc=f"client {client_id} (dpo)",
        show_progress=show_progress,
    )
    extras = hook.finish(params, num_steps, learning_rate)
    seen = max(stats.pairs, 1)
    return ClientUpdate(
        client_id=client_id,
        state=get_adapter_state(model),
        num_examples=len(pairs),
        num_steps=num_steps,
        learning_rate=learning_rate,
        extras=extras,
        metrics={
            "train_loss": stats.loss_sum / seen,
            "dpo_accuracy": stats.correct / seen,
            "dpo_margin": stats.margin_sum / seen,
            "label_tokens": stats.label_tokens,
            "real_tokens": stats.real_tokens,
            "computed_tokens": stats.computed_tokens,
            "steps": num_steps,
            "skipped_steps": stats.skipped_steps,
            "step_seconds": stats.step_seconds,
            "reference_seconds": reference_seconds,
            "seconds": time.perf_counter() - started,
        },
    )
