"""The lean local training loop every client runs in a round (SFT).

Written by hand rather than with transformers' Trainer: building a Trainer per client per
round, re-mapping datasets and checkpointing through disk is what makes the reference
codes slow. Here a round is: plan length-grouped batches from a derived seed, run AdamW
over micro-batches with gradient accumulation, clip, step; return the adapter tensors.
The same function serves simulated clients and networked ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fedit.client.batching import collate, plan_batches, split_micro_batches
from fedit.client.hooks import ClientHook
from fedit.client.loss import row_loss_sums
from fedit.client.precision import autocast, grad_scaler
from fedit.config import TrainConfig
from fedit.data.tokenize import TokenizedExample
from fedit.models.adapters import adapter_parameters, get_adapter_state
from fedit.types import ClientUpdate


def steps_per_round(num_examples: int, cfg: TrainConfig) -> int:
    """Optimizer steps a client takes in one round: max_steps, or local_epochs passes."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.local_epochs * num_examples / cfg.batch_size))


def round_learning_rate(cfg: TrainConfig, round_index: int, num_rounds: int) -> float:
    """Constant, or cosine-decayed across rounds (constant within a round)."""
    if cfg.lr_schedule == "constant" or num_rounds <= 1:
        return cfg.learning_rate
    progress = round_index / (num_rounds - 1)
    return cfg.min_lr + 0.5 * (cfg.learning_rate - cfg.min_lr) * (1 + math.cos(math.pi * progress))


class NonFiniteTrainingError(ValueError):
    """A client's loss or gradients went non-finite in a step no loss scaler skips (fp32 or
    bf16): its round is stopped, and the engine leaves it out of the aggregate."""

    def __init__(self, client_id: int, step: int, what: str) -> None:
        self.client_id, self.step, self.what = client_id, step, what
        super().__init__(f"client {client_id}: {self.reason}")

    @property
    def reason(self) -> str:
        return f"non-finite {self.what} at local step {self.step}"


@dataclass
class StepStats:
    loss_sum: float = 0.0
    label_tokens: int = 0
    real_tokens: int = 0
    computed_tokens: int = 0  # including padding
    step_seconds: float = 0.0
    skipped_steps: int = 0  # steps fp16 loss scaling skipped (non-finite gradients)


def _accumulate(
    model: torch.nn.Module,
    examples: Sequence[TokenizedExample],
    batch: list[int],
    lengths: Sequence[int],
    cfg: TrainConfig,
    pad_id: int,
    hook: ClientHook,
    params: dict[str, torch.nn.Parameter],
    scaler: torch.amp.GradScaler,
    stats: StepStats,
) -> torch.Tensor:
    """Forward and backward over one optimizer batch; loss is the token-weighted mean.
    Returns the batch's loss as back-propagated (unscaled, detached)."""
    micro_batches = split_micro_batches(
        batch, lengths, cfg.micro_batch_size, cfg.max_tokens_per_forward
    )
    device = next(iter(params.values())).device
    total_labels = sum(sum(lab != -100 for lab in examples[i].labels[1:]) for i in batch)
    batch_loss = torch.zeros((), device=device)
    for micro in micro_batches:
        rows = [(examples[i].input_ids, examples[i].labels) for i in micro]
        inputs = collate(rows, pad_id, device)
        with autocast(model, cfg.mixed_precision):
            sums, _ = row_loss_sums(model, inputs, cfg.logits_on_labels_only)
        loss = sums.sum() / max(total_labels, 1)
        extra = hook.loss_term(params)
        if extra is not None:
            loss = loss + extra / len(micro_batches)
        scaler.scale(loss).backward()
        batch_loss += loss.detach()
        stats.loss_sum += float(sums.detach().sum())
        stats.real_tokens += int(inputs["attention_mask"].sum())
        stats.computed_tokens += inputs["input_ids"].numel()
    stats.label_tokens += total_labels
    return batch_loss


Accumulate = Callable[[list[int], torch.amp.GradScaler], torch.Tensor]


def _all_finite(loss: torch.Tensor, params: dict[str, torch.nn.Parameter]) -> tuple[bool, bool]:
    """(loss finite, every gradient finite), with one device sync."""
    checks = [torch.isfinite(loss).all()]
    checks += [torch.isfinite(p.grad).all() for p in params.values() if p.grad is not None]
    finite = torch.stack(checks).tolist()
    return finite[0], all(finite[1:])


def run_optimizer_steps(
    model: torch.nn.Module,
    batches: list[list[int]],
    cfg: TrainConfig,
    *,
    params: dict[str, torch.nn.Parameter],
    learning_rate: float,
    hook: ClientHook,
    accumulate: Accumulate,
    client_id: int,
    stats: StepStats,
    desc: str,
    show_progress: bool = False,
) -> None:
    """One optimizer step per planned batch; adds the seconds spent in steps and the steps
    skipped to ``stats``.

    ``accumulate(batch, scaler)`` runs forward and backward over the batch's micro-batches
    and returns the batch loss (the objective's part: SFT here, DPO in
    fedit.client.dpo_trainer); around it every objective shares AdamW, loss scaling, the
    hooks' gradient adjustment and clipping. Non-finite values: with fp16 loss scaling a
    step whose gradients overflow is skipped, as GradScaler does, and the hooks do not see
    it (one inf would make SCAFFOLD's c_k infinite); it is counted in
    ``stats.skipped_steps``. Without a scaler (fp32, bf16) nothing would recover, so a
    non-finite loss or gradient raises NonFiniteTrainingError.
    """
    optimizer = torch.optim.AdamW(params.values(), lr=learning_rate, weight_decay=cfg.weight_decay)
    scaler = grad_scaler(cfg.mixed_precision, model)
    model.train()
    hook.start(params)
    for step, batch in enumerate(
        tqdm(batches, desc=desc, leave=False, disable=not show_progress), start=1
    ):
        step_started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = accumulate(batch, scaler)
        scaler.unscale_(optimizer)  # hooks and clipping see true gradients
        finite_loss, finite_grads = _all_finite(loss, params)
        if not finite_grads and scaler.is_enabled():
            stats.skipped_steps += 1  # scaler.step skips it and lowers the scale
        elif not (finite_loss and finite_grads):
            raise NonFiniteTrainingError(
                client_id, step, "loss" if not finite_loss else "gradients"
            )
        else:
            hook.adjust_gradients(params)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        stats.step_seconds += time.perf_counter() - step_started


def train_client(
    model: torch.nn.Module,
    examples: Sequence[TokenizedExample],
    cfg: TrainConfig,
    *,
    client_id: int,
    learning_rate: float,
    seed: int,
    pad_id: int,
    hook: ClientHook | None = None,
    show_progress: bool = False,
) -> ClientUpdate:
    """Train the adapter currently in `model` on one client's examples for one round."""
    hook = hook or ClientHook()
    # read once: stored examples (fedit.data.token_store) build their lists on each access
    examples = list(examples)
    params = adapter_parameters(model)
    num_steps = steps_per_round(len(examples), cfg)
    lengths = [len(e.input_ids) for e in examples]
    batches = plan_batches(lengths, cfg.batch_size, num_steps, seed, cfg.group_by_length)
    torch.manual_seed(seed)  # LoRA dropout draws from the global generator
    stats = StepStats()
    started = time.perf_counter()

    def accumulate(batch: list[int], scaler: torch.amp.GradScaler) -> torch.Tensor:
        return _accumulate(
            model, examples, batch, lengths, cfg, pad_id, hook, params, scaler, stats
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
        desc=f"client {client_id}",
        show_progress=show_progress,
    )
    extras = hook.finish(params, num_steps, learning_rate)
    return ClientUpdate(
        client_id=client_id,
        state=get_adapter_state(model),
        num_examples=len(examples),
        num_steps=num_steps,
        learning_rate=learning_rate,
        extras=extras,
        metrics={
            "train_loss": stats.loss_sum / max(stats.label_tokens, 1),
            "label_tokens": stats.label_tokens,
            "real_tokens": stats.real_tokens,
            "computed_tokens": stats.computed_tokens,
            "steps": num_steps,
            "skipped_steps": stats.skipped_steps,
            "step_seconds": stats.step_seconds,
            "seconds": time.perf_counter() - started,
        },
    )
