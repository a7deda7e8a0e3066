"""``LoRALinear``: LoRA on any ``nn.Linear``, with S slots for a packed projection.

Most attention modules call their projection Linears (timm's ``Attention``,
``AttentionRope``, ``EvaAttention``, ``WindowAttention``, ``AttentionPoolLatent``;
Hugging Face self-attention; open_clip's ``AttentionPool2d`` once its forward is pointed
at its Linears, see :mod:`clip_lora.families`).  For those, swapping the Linears is the
whole patch: the module's own attention code, rope, norms and masks stay untouched.

The output columns of the Linear are ``S`` equal slots (``("q", "k", "v")`` for timm's
packed ``qkv``, ``("k", "v")`` for ``AttentionPoolLatent.kv``, ``("o",)`` for an output
projection); each adapted slot gets its own ``A [r, in]`` / ``B [out/S, r]``, and the
whole Linear runs as ONE :func:`lora_kernels.lora_linear` call (per-slot dropout masks).

The frozen ``weight`` and ``bias`` are the original ``Parameter`` objects under their
original names, so state-dict keys do not change; the adapters are the extra keys
``lora_A.<p>`` and ``lora_B.<p>``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_kernels

from .attention import PROVIDERS, MergeableLoRA
from .slots import SlotAdapters


class LoRALinear(MergeableLoRA):
    """An ``nn.Linear`` with LoRA on some of its output slots.

    Args:
        linear: the Linear to stand in for; its parameters are shared, not copied, and it
            is kept (unregistered) for :meth:`original`.
        slots: the name of each of the S equal column slices of the output.
        params: which slots get an adapter (the others stay frozen; at least one).
        r, scale, dropout, provider: as in :class:`~clip_lora.attention.LoRAAttention`.
    """

    def __init__(
        self,
        linear: nn.Linear,
        *,
        slots: Sequence[str],
        params: Sequence[str],
        r: int,
        scale: float,
        dropout: float,
        provider: str = "fused",
    ) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear stands in for torch.nn.Linear, got {type(linear).__name__}")
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
        self.slots = tuple(slots)
        if not self.slots or linear.out_features % len(self.slots):
            raise ValueError(f"{linear.out_features} output features do not split into slots {self.slots}")
        self.params = tuple(s for s in self.slots if s in params)
        if not self.params:
            raise ValueError(f"none of the slots {self.slots} is in params {tuple(params)}")
        self.provider = provider
        self.r, self.scale, self.dropout = int(r), float(scale), float(dropout)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.slot_size = linear.out_features // len(self.slots)
        # The original objects under the original names: state-dict compatible, no copy.
        self.weight = linear.weight
        self.bias = linear.bias
        # A tuple hides the original from .modules()/.state_dict(); unpatch puts it back.
        self._original = (linear,)
        device = linear.weight.device
        # Fused: the slots' adapters packed when all are adapted (see clip_lora.slots).
        packed = provider == "fused"
        groups = (self.slots,)
        self.lora_A = SlotAdapters(
            groups, self.params, dict.fromkeys(self.slots, self.r), self.in_features,
            packed=packed, init="kaiming", device=device,
        )
        self.lora_B = SlotAdapters(
            groups, self.params, dict.fromkeys(self.slots, self.slot_size), self.r,
            packed=packed, init="zeros", device=device,
        )
        # Checked once here; each call checks only shapes, dtypes and devices.
        self._layouts = (
            {self.slots: lora_kernels.slot_layout(self.in_features, [self.slot_size] * len(self.slots), self.r)}
            if self.lora_A.packed(self.slots) is not None
            else {}
        )
        self.merged = False
        self._unmerged: dict[str, torch.Tensor] = {}
        self.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return self._lora_projection(x, self.weight, self.bias, self.slots)

    # -- merge / unmerge / unpatch -------------------------------------------

    def _rows(self, name: str) -> slice:
        i = self.slots.index(name)
        return slice(i * self.slot_size, (i + 1) * self.slot_size)

    def _targets(self) -> dict[str, tuple[torch.Tensor, slice]]:
        return {p: (self.weight, self._rows(p)) for p in self.params}

    def merged_weights(self) -> dict[str, torch.Tensor]:
        """``{"weight": W + scale·B A on the adapted rows}``; the module is not changed."""
        w = self.weight.detach().clone()
        if not self.merged:
            for p in self.params:
                rows = self._rows(p)
                w[rows] = (w[rows].float() + self.delta(p)).to(w.dtype)
        return {"weight": w}

    def original(self) -> nn.Linear:
        """The Linear this one replaced, with the current (unmerged) frozen weights."""
        self.unmerge()
        linear = self._original[0]
        linear.weight = self.weight
        if self.bias is not None:
            linear.bias = self.bias
        linear.train(self.training)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, slots={','.join(self.slots)}, "
            f"params={','.join(self.params)}, r={self.r}, scale={self.scale:.4g}, dropout={self.dropout}, "
            f"provider={self.provider}, merged={self.merged}"
        )
