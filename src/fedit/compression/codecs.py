"""Upload codecs: how a client's delta Δ = y − x is written for the wire, and what it loses.

Each codec is a pair of pure functions over one tensor (``encode_tensor`` → named parts,
``decode_tensor`` → the tensor again) and a layout (``part_layout``: every part's dtype and
shape, known to the receiver from the adapter's shapes alone, so a peer's parts are checked
before they are read). Per entry of a tensor with n entries:

- ``none``: float32, 4 bytes, exact.
- ``bf16``: bfloat16 (round to nearest even), 2 bytes; |v − v̂| ≤ 2⁻⁸·|v| (8 significant
  bits), and values below bf16's smallest normal, 2⁻¹²⁶, may flush further.
- ``int8``: per-slice absmax quantisation. A 2-D tensor is cut into slices along its longer
  side, one per index of its shorter side: for a LoRA factor that is one slice per rank
  component (the r rows of A, r × in; the r columns of B, out × r), so the r scales are
  the only overhead. Per slice s = max|v|/127 (float32) and q = round(v/s) in [−127, 127]
  (int8): |v − s·q| ≤ s/2. n bytes plus 4 per slice. Other shapes are one slice.
- ``topk``: the k = ⌈fraction·n⌉ entries of largest |v| as float32 values with their int32
  flat indices (ascending), 8 bytes per kept entry; every other entry decodes to 0, which
  is what error feedback carries to the client's next round (fedit.client.feedback).

The wire's bytes (metrics.jsonl's bytes_up) are what fedit.protocol.wire.content_bytes counts
of the encoded parts (one array per part, so a few hundred bytes of framing);
``payload_bytes`` is their raw size, the figure the per-entry costs
above describe. Written here rather than taken from a library because the parts must be
plain tensors that fedit's wire validates, and torch has every operation they need.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from fedit.plugins import CODECS
from fedit.types import AdapterState

INT8_LEVELS = 127  # symmetric: −127..127, so that −q decodes to −v
Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # part name → (dtype, shape)


class CodecError(ValueError):
    """Encoded parts that do not decode (a peer's: the message names the tensor)."""


def kept_entries(numel: int, fraction: float) -> int:
    """k of topk for a tensor of `numel` entries: ⌈fraction·numel⌉, at least 1."""
    return min(numel, max(1, math.ceil(fraction * numel)))


def _slice_axis(shape: tuple[int, ...]) -> int | None:
    """The axis whose indices name int8's slices (the shorter side of a 2-D tensor); None
    for a tensor that is one slice."""
    if len(shape) != 2:
        return None
    return 0 if shape[0] <= shape[1] else 1


def part_layout(codec: str, shape: tuple[int, ...], fraction: float) -> Layout:
    """Every part `codec` writes for a tensor of `shape` (topk's `fraction`)."""
    numel = math.prod(shape)
    if codec == "none":
        return {"values": (torch.float32, shape)}
    if codec == "bf16":  # bfloat16's bits as int16: numpy, and so the wire, has no bfloat16
        return {"bits": (torch.int16, shape)}
    if codec == "int8":
        axis = _slice_axis(shape)
        slices = 1 if axis is None else shape[axis]
        return {"q": (torch.int8, shape), "scale": (torch.float32, (slices,))}
    if codec == "topk":
        k = kept_entries(numel, fraction)
        return {"indices": (torch.int32, (k,)), "values": (torch.float32, (k,))}
    raise ValueError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")


def encode_tensor(codec: str, tensor: Tensor, fraction: float) -> dict[str, Tensor]:
    """`tensor` (float32) as `codec`'s parts, contiguous CPU tensors of part_layout's."""
    value = tensor.detach().float().cpu().contiguous()
    if codec == "none":
        return {"values": value}
    if codec == "bf16":
        return {"bits": value.to(torch.bfloat16).view(torch.int16).contiguous()}
    if codec == "int8":
        scale = _absmax(value) / INT8_LEVELS
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(value / _broadcast(safe, value.shape)).clamp(-INT8_LEVELS, INT8_LEVELS)
        return {"q": q.to(torch.int8).contiguous(), "scale": scale.reshape(-1).contiguous()}
    if codec == "topk":
        flat = value.reshape(-1)
        k = kept_entries(flat.numel(), fraction)
        indices = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
        return {"indices": indices.to(torch.int32), "values": flat[indices].contiguous()}
    raise ValueError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")


def _absmax(value: Tensor) -> Tensor:
    """max |v| per slice (shape: one entry per slice)."""
    axis = _slice_axis(tuple(value.shape))
    if axis is None:
        return value.abs().max().reshape(1)
    return value.abs().amax(dim=1 - axis)


def _broadcast(per_slice: Tensor, shape: torch.Size) -> Tensor:
    """Per-slice values shaped to multiply a tensor of `shape`."""
    axis = _slice_axis(tuple(shape))
    if axis is None:
        return per_slice.reshape(())
    return per_slice.reshape(-1, 1) if axis == 0 else per_slice.reshape(1, -1)


def decode_tensor(
    codec: str, parts: Mapping[str, Tensor], shape: tuple[int, ...], where: str
) -> Tensor:
    """The float32 tensor of `shape` that `parts` (already of part_layout's dtypes and
    shapes) encode; CodecError naming `where` for values no encoder writes."""
    if codec == "none":
        decoded = parts["values"].float()
    elif codec == "bf16":
        decoded = parts["bits"].view(torch.bfloat16).float()
    elif codec == "int8":
        decoded = _decode_int8(parts["q"], parts["scale"], shape, where)
    elif codec == "topk":
        decoded = _decode_topk(parts["indices"], parts["values"], shape, where)
    else:
        raise ValueError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
    if not bool(torch.isfinite(decoded).all()):
        raise CodecError(f"{where}: decodes to non-finite values")
    return decoded.contiguous()


def _decode_int8(q: Tensor, scale: Tensor, shape: tuple[int, ...], where: str) -> Tensor:
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise CodecError(f"{where}: int8 scales must be finite and >= 0")
    if bool((q == -128).any()):
        raise CodecError(f"{where}: int8 value -128 (the codec writes -127..127)")
    return q.float() * _broadcast(scale.float(), torch.Size(shape))


def _decode_topk(indices: Tensor, values: Tensor, shape: tuple[int, ...], where: str) -> Tensor:
    numel = math.prod(shape)
    idx = indices.long()
    if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= numel):
        raise CodecError(f"{where}: topk index out of range [0, {numel})")
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise CodecError(f"{where}: topk indices must be strictly ascending")
    flat = torch.zeros(numel, dtype=torch.float32)
    flat[idx] = values.float()
    return flat.reshape(shape)


def state_layout(codec: str, shapes: Mapping[str, tuple[int, ...]], fraction: float) -> Layout:
    """The parts of a whole delta: each part of every tensor, flattened and concatenated in
    sorted tensor-name order, is one 1-D part (one array on the wire, not one per tensor:
    an adapter has hundreds of tensors, and each array costs a header)."""
    lengths: dict[str, int] = {}
    dtypes: dict[str, torch.dtype] = {}
    for name in sorted(shapes):
        for part, (dtype, shape) in part_layout(codec, tuple(shapes[name]), fraction).items():
            lengths[part] = lengths.get(part, 0) + math.prod(shape)
            dtypes[part] = dtype
    return {part: (dtypes[part], (length,)) for part, length in lengths.items()}


def encode_state(codec: str, delta: AdapterState, fraction: float) -> dict[str, Tensor]:
    """`delta` as state_layout's parts."""
    pieces: dict[str, list[Tensor]] = {}
    for name in sorted(delta):
        for part, tensor in encode_tensor(codec, delta[name], fraction).items():
            pieces.setdefault(part, []).append(tensor.reshape(-1))
    return {part: torch.cat(tensors) for part, tensors in pieces.items()}


def decode_state(
    codec: str,
    parts: Mapping[str, Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    fraction: float,
) -> AdapterState:
    """The delta of `shapes` that `parts` (of state_layout's dtypes and shapes) encode;
    CodecError naming the tensor whose values no encoder writes."""
    at: dict[str, int] = dict.fromkeys(parts, 0)
    delta = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        own = {}
        for part, (_, part_shape) in part_layout(codec, shape, fraction).items():
            size = math.prod(part_shape)
            own[part] = parts[part][at[part] : at[part] + size].reshape(part_shape)
            at[part] += size
        delta[name] = decode_tensor(codec, own, shape, name)
    return {name: delta[name] for name in shapes}


def payload_bytes(parts: Mapping[str, Tensor]) -> int:
    """The raw bytes of every part, before the wire's framing."""
    return sum(part.numel() * part.element_size() for part in parts.values())
