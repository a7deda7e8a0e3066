"""Plain PyTorch LoRA baselines: what users write without fused kernels.

* :func:`plain_lora_linear` - PEFT-style eager LoRA: the frozen projection, then per
  adapted slot its own ``F.dropout`` copy of x, two small matmuls and an add.  Autograd
  saves a dropped copy of x and a mask per adapter.  The benchmarks' "plain" provider
  and the CLIP layer's reference provider.
* :func:`official_style_lora_linear` - the CLIP-LoRA paper's code: q, k and v as three
  separate projections, each adding ``dropout(x) (B A)ᵀ`` with the dense ``B @ A``.

Both take the same keyword arguments as :func:`lora_kernels.lora_linear`, except that
dropout follows torch's RNG (``training=True``) instead of an explicit seed.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _slot_starts(slot_sizes: Sequence[int]) -> list[int]:
    return [0, *itertools.accumulate(slot_sizes)][:-1]


def _default_sizes(weight: torch.Tensor, n_slots: int, slot_sizes: Sequence[int] | None) -> list[int]:
    if slot_sizes is not None:
        return list(slot_sizes)
    N = weight.shape[0]
    if N % n_slots:
        raise ValueError(f"N={N} does not split into {n_slots} equal slots; pass slot_sizes")
    return [N // n_slots] * n_slots


def plain_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    lora_a: Sequence[torch.Tensor | None],
    lora_b: Sequence[torch.Tensor | None],
    scale: float,
    slot_sizes: Sequence[int] | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """PEFT-style LoRA over S column slots of one packed projection."""
    sizes = _default_sizes(weight, len(lora_a), slot_sizes)
    y = F.linear(x, weight, bias)
    deltas = []
    for a, b, n in zip(lora_a, lora_b, sizes):
        if a is None:
            deltas.append(y.new_zeros(*y.shape[:-1], n))
            continue
        xd = F.dropout(x, dropout_p, training)
        deltas.append(F.linear(F.linear(xd.to(a.dtype), a), b).to(y.dtype) * scale)
    return y + torch.cat(deltas, dim=-1)


def official_style_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    lora_a: Sequence[torch.Tensor | None],
    lora_b: Sequence[torch.Tensor | None],
    scale: float,
    slot_sizes: Sequence[int] | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """The paper's layout: one projection per slot, each with a dense ``B @ A`` update."""
    sizes = _default_sizes(weight, len(lora_a), slot_sizes)
    outs = []
    for a, b, start, n in zip(lora_a, lora_b, _slot_starts(sizes), sizes):
        w_s = weight[start : start + n]
        b_s = bias[start : start + n] if bias is not None else None
        out = F.linear(x, w_s, b_s)
        if a is not None:
            delta_w = (b @ a).to(x.dtype)
            out = out + F.linear(F.dropout(x, dropout_p, training), delta_w) * scale
        outs.append(out)
    return torch.cat(outs, dim=-1)
