"""CLIP-LoRA on open_clip: patch fused LoRA attention into CLIP, train few-shot, save adapters.

    model, _, preprocess, tokenizer = clip_lora.create_model("ViT-B-16", pretrained="openai")
    # or: clip_lora.patch_fused(open_clip_model, clip_lora.LoRAConfig(r=2, params=("q", "k", "v")))

The patching layer (this package's top level) knows open_clip and ``lora_kernels``; the
few-shot recipe (datasets, training, evaluation, CLI) lives in its own modules.
"""

from .adapters import load_adapter, load_official_adapter, save_adapter
from .attention import LoRAAttention
from .config import LoRAConfig
from .linear import LoRALinear
from .model import create_model
from .patch import (
    count_trainable,
    load_base_state_dict,
    lora_grads,
    lora_parameters,
    lora_state_dict,
    merge,
    merged_state_dict,
    patch_fused,
    patch_reference,
    unmerge,
    unpatch,
)
from .text import bucket_cost, encode_class_prompts, encode_text_bucketed, encode_text_trimmed, plan_text

__all__ = [
    "LoRAAttention",
    "LoRAConfig",
    "LoRALinear",
    "bucket_cost",
    "count_trainable",
    "create_model",
    "encode_class_prompts",
    "encode_text_bucketed",
    "encode_text_trimmed",
    "load_adapter",
    "load_base_state_dict",
    "load_official_adapter",
    "lora_grads",
    "lora_parameters",
    "lora_state_dict",
    "merge",
    "merged_state_dict",
    "patch_fused",
    "patch_reference",
    "plan_text",
    "save_adapter",
    "unmerge",
    "unpatch",
]
