"""Mixed LoRA ranks: clients that afford different ranks in one federation.

The global adapter has rank r (lora.r). Client k has rank r_k ≤ r and trains only the first
r_k components: the rows j < r_k of each A (r × in) and the columns j < r_k of each B
(out × r), with the global scaling s = alpha / r, so a device with rank r_k is exactly a
PEFT LoRA of r = r_k and alpha = s·r_k. It receives the global adapter truncated
(``at_rank``: components j ≥ r_k zeroed). Those stay exactly zero through its training,
since the gradient of A_j is s·B_jᵀ·G·xᵀ and that of B_j is s·G·(A_j x)ᵀ.

Whatever a client sends beyond its rank is ignored: it has no such components. The server
first puts the global's own values there (Δ = 0) for validation, then builds what the
strategy aggregates (``for_aggregation``):

- ``zero_pad`` (HetLoRA, Cho et al. 2024, "Heterogeneous LoRA for Federated Fine-tuning of
  On-Device Foundation Models"): the client's factors padded with zeros, so the mean of
  component j is Σ_{k: r_k > j} p_k y_kj: components few clients hold shrink towards 0.
  With ``lora_aggregation = "exact"`` the FedEx-LoRA residual then makes the merged model
  the exact p-weighted sum of every client's own merged model, which is what FLoRA (Wang et
  al. 2024) gets by stacking the factors: the same mechanism, no second copy of it. Across
  rounds too: a client's truncated start lacks the components j ≥ r_k of the global
  product, so it trains under its own base weights W0 + R + s·Σ_{j≥r_k} B_j A_j
  (``unseen_product``; fedit.engine.runner.RoundPlan.start_residual) and starts from the
  global merged model, and the round folds Σ_k p_k of those parts into R. A round in which
  no client changes anything then leaves the merged model as it was (FLoRA's fixed point;
  before, with ranks 1/2/4 on the tiny model it moved by up to 16% of what the first
  round of training had moved it, now by 2e-7).
- ``holders``: component j averaged over the clients that hold it,
  Σ_{k: r_k > j} p_k y_kj / Σ_{k: r_k > j} p_k, done by giving each other client the
  holders' mean there, so that every strategy's plain mean of the updates is it. One
  client's values so enter many updates: the config refuses it with central DP and with
  the robust aggregators, whose guarantees count each client once.

Ranks are assigned from the config (``client_ranks``), or by tiers: ⌊share·N⌉ clients per
tier (largest remainders), placed by a permutation seeded by the run seed.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fedit.config import RunConfig
from fedit.ops.lora_aggregation import BASE_WEIGHT, LORA_A, LORA_B, lora_pairs
from fedit.seeding import Stream, derive_seed
from fedit.types import AdapterState


def client_ranks(cfg: RunConfig, num_clients: int) -> list[int] | None:
    """Every client's rank, or None when all train at lora.r."""
    lora = cfg.lora
    if lora.client_ranks:
        if len(lora.client_ranks) != num_clients:
            raise ValueError(f"lora.client_ranks: {len(lora.client_ranks)} for {num_clients}")
        return list(lora.client_ranks)
    if not lora.rank_tiers:
        return None
    exact = [share * num_clients for share in lora.tier_shares]
    counts = [int(c) for c in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: num_clients - sum(counts)]:
        counts[i] += 1
    ranks = [
        rank for rank, count in zip(lora.rank_tiers, counts, strict=True) for _ in range(count)
    ]
    order = np.random.default_rng(derive_seed(cfg.seed, Stream.RANKS)).permutation(num_clients)
    return [ranks[int(i)] for i in order]


def at_rank(state: AdapterState, rank: int, fill: AdapterState | None = None) -> AdapterState:
    """`state` with components j ≥ `rank` of every LoRA pair taken from `fill` (zeros when
    None): rows of A, columns of B. Other tensors are kept. A new state."""
    out = dict(state)
    for a_key, b_key in lora_pairs(state).values():
        a, b = state[a_key].clone(), state[b_key].clone()
        a[rank:] = 0 if fill is None else fill[a_key][rank:]
        b[:, rank:] = 0 if fill is None else fill[b_key][:, rank:]
        out[a_key], out[b_key] = a, b
    return out


def rank_shapes(
    shapes: Mapping[str, tuple[int, ...]], rank: int | None
) -> dict[str, tuple[int, ...]]:
    """The shapes a rank-`rank` client's tensors have on the wire: A is rank × in, B is
    out × rank (None: the global rank, `shapes` as they are)."""
    if rank is None:
        return dict(shapes)
    out = {}
    for key, shape in shapes.items():
        if LORA_A in key:
            out[key] = (rank, *shape[1:])
        elif LORA_B in key:
            out[key] = (shape[0], rank)
        else:
            out[key] = tuple(shape)
    return out


def shrink(state: AdapterState, rank: int | None) -> AdapterState:
    """A rank-`rank` client's own components only (what the wire carries), contiguous."""
    if rank is None:
        return state
    return {
        key: (t[:rank] if LORA_A in key else t[:, :rank] if LORA_B in key else t).contiguous()
        for key, t in state.items()
    }


def grow(state: AdapterState, shapes: Mapping[str, tuple[int, ...]]) -> AdapterState:
    """shrink's inverse: each tensor zero-padded to `shapes` (components beyond the rank)."""
    out = {}
    for key, t in state.items():
        if tuple(t.shape) == tuple(shapes[key]):
            out[key] = t
            continue
        full = torch.zeros(shapes[key], dtype=t.dtype)
        full[tuple(slice(0, n) for n in t.shape)] = t
        out[key] = full
    return out


def global_at(global_state: AdapterState, rank: int | None) -> AdapterState:
    """The global adapter as a client of `rank` trains from it (None: the global rank)."""
    return global_state if rank is None else at_rank(global_state, rank)


def unseen_product(
    global_state: AdapterState, ranks: list[int], weights: list[float], scaling: float
) -> dict[str, torch.Tensor]:
    """{"<prefix>.base_layer.weight": s·Σ_j c_j B_j A_j} with c_j = Σ_{k: r_k ≤ j} p_k: the
    p-weighted mean of what each client's truncated global adapter (``at_rank``) leaves out
    of the global product s·B·A, its components j ≥ r_k (out × in, float32). With one
    client (ranks [r_k], weights [1]) what that client cannot see; {} where no rank lacks
    a component."""
    out = {}
    for prefix, (a_key, b_key) in lora_pairs(global_state).items():
        a, b = global_state[a_key].float(), global_state[b_key].float()
        component = torch.arange(a.shape[0])
        share = sum(w * (component >= rank).float() for rank, w in zip(ranks, weights, strict=True))
        if bool(share.any()):
            out[prefix + BASE_WEIGHT] = scaling * (b * share) @ a
    return out


def holders_mean(
    states: list[AdapterState], ranks: list[int], weights: list[float], fallback: AdapterState
):
    """Per LoRA tensor, each component's weighted mean over the states that hold it (A: per
    row, B: per column), `fallback`'s value where none does (the global's: a round whose
    clients all lack a component leaves it as it was). {key: tensor} of the LoRA tensors."""
    means = {}
    for a_key, b_key in lora_pairs(states[0]).values():
        for key, axis in ((a_key, 0), (b_key, 1)):
            size = states[0][key].shape[axis]
            held = torch.tensor(
                [
                    [float(j < rank) * w for j in range(size)]
                    for rank, w in zip(ranks, weights, strict=True)
                ]
            )  # (clients, r): p_k where client k holds component j
            stacked = torch.stack([s[key].float() for s in states])
            shape = (len(states), size, 1) if axis == 0 else (len(states), 1, size)
            total = (held.reshape(shape) * stacked).sum(0)
            mass = held.sum(0)
            safe = torch.where(mass > 0, mass, torch.ones_like(mass))
            mean = total / (safe.reshape(-1, 1) if axis == 0 else safe.reshape(1, -1))
            held_any = (mass > 0).reshape(-1, 1) if axis == 0 else (mass > 0).reshape(1, -1)
            means[key] = torch.where(held_any, mean, fallback[key].float())
    return means


def for_aggregation(
    states: list[AdapterState],
    ranks: list[int],
    weights: list[float],
    mode: str,
    global_state: AdapterState,
) -> list[AdapterState]:
    """What the strategy aggregates: each state beyond its client's rank zero-padded, or
    holding the holders' mean (see the module docstring; `global_state` where no client of
    the round holds a component)."""
    if mode == "zero_pad":
        return [at_rank(s, rank) for s, rank in zip(states, ranks, strict=True)]
    if mode == "holders":
        means = holders_mean(states, ranks, weights, global_state)
        return [at_rank(s, rank, means) for s, rank in zip(states, ranks, strict=True)]
    raise ValueError(f"unknown rank aggregation {mode!r}")
