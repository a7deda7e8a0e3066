"""Build an open_clip model with LoRA already patched in."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from .config import LoRAConfig
from .patch import patch_fused, patch_reference

MODEL_NAME_ATTR = "clip_lora_model_name"
PAPER_LORA = LoRAConfig()  # the paper's fixed recipe (frozen dataclass: a safe default)


def _check_model_name(name: str) -> str:
    """open_clip's spelling of ``name`` ("ViT-B/16" -> "ViT-B-16"), or an error that lists
    close and common names.  Hub and local-directory specs pass through."""
    import open_clip

    if name.startswith(("hf-hub:", "local-dir:")):
        return name
    available = open_clip.list_models()
    for candidate in (name, name.replace("/", "-")):
        if candidate in available:
            return candidate
    close = difflib.get_close_matches(name.replace("/", "-"), available, n=5, cutoff=0.5)
    common = [m for m in ("ViT-B-16", "ViT-B-32", "ViT-L-14") if m in available]
    raise ValueError(
        f"unknown open_clip model {name!r}; closest: {', '.join(close) or 'none'}; the paper uses "
        f"{', '.join(common)} (open_clip.list_models() has all {len(available)})"
    )


def create_model(
    name: str = "ViT-B-16",
    pretrained: str | None = None,
    lora: LoRAConfig | None = PAPER_LORA,
    fused: bool = True,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    **open_clip_kwargs: Any,
) -> tuple[nn.Module, Callable, Callable, Callable]:
    """Create an open_clip model, patch LoRA into it, and return its transforms and tokenizer.

    Args:
        name: open_clip model name ("ViT-B-16", "ViT-B-32", "ViT-L-14"; the OpenAI
            spelling "ViT-B/16" is accepted), or an "hf-hub:"/"local-dir:" spec.
        pretrained: weights: an open_clip tag such as "openai", a local checkpoint path,
            or None for a random init of the real architecture (no download).
        lora: where to put adapters (default: the paper's recipe); None returns the
            unpatched model.
        fused: the fused Triton kernels (True) or the plain PyTorch reference provider.
        device: where to build the model (default CPU).
        precision: open_clip's ``precision`` ("fp32", "fp16", "bf16", "pure_fp16", ...).
            LoRA training keeps fp32 weights and runs under autocast; the adapters are
            fp32 in every case.
        **open_clip_kwargs: passed on to ``open_clip.create_model_and_transforms``
            (e.g. ``aug_cfg``, ``cache_dir``).

    Returns:
        ``(model, preprocess_train, preprocess_val, tokenizer)``: the patched model (its
        name recorded as ``model.clip_lora_model_name``), open_clip's train and eval image
        transforms (open_clip's own train augmentation, not the paper's RandomResizedCrop
        + flip recipe), and the model's tokenizer (bundled, works offline).
    """
    import open_clip

    name = _check_model_name(name)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, precision=precision, device=device or "cpu", **open_clip_kwargs
    )
    tokenizer = open_clip.get_tokenizer(name)
    setattr(model, MODEL_NAME_ATTR, name)
    if lora is not None:
        (patch_fused if fused else patch_reference)(model, lora)
    return model, preprocess_train, preprocess_val, tokenizer
