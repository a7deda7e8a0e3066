"""Fused Triton kernels for LoRA linear layers (knows nothing of CLIP).

``lora_linear`` is the fused op (Triton on CUDA, the same math in PyTorch on CPU);
``lora_linear_packed`` is its per-step form for modules that keep A and B packed;
``plain_lora_linear`` and ``official_style_lora_linear`` are the unfused baselines;
``reference_lora_linear`` is the math written out, for checking (differentiate it in fp64).
"""

from .dropout import dropout_mask
from .fused_lora import MAX_RANK, MAX_SLOTS, SlotLayout, draw_seed, lora_linear, lora_linear_packed, slot_layout
from .plain import official_style_lora_linear, plain_lora_linear
from .reference import reference_lora_linear

__all__ = [
    "MAX_RANK",
    "MAX_SLOTS",
    "SlotLayout",
    "draw_seed",
    "dropout_mask",
    "lora_linear",
    "lora_linear_packed",
    "official_style_lora_linear",
    "plain_lora_linear",
    "reference_lora_linear",
    "slot_layout",
]
