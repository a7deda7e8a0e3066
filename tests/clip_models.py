"""Small real open_clip models and inputs shared by the tests/test_clip_*.py files."""

import torch
import torch.nn as nn
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from clip_lora import lora_parameters


def tiny_clip(custom: bool, depth: int = 2, seed: int = 0) -> nn.Module:
    """A small real open_clip CLIP in eval mode.  ``custom`` builds open_clip's own
    ``Attention`` (with qk-norm, per-head scale and inner norm, all randomised so they
    matter); otherwise ``nn.MultiheadAttention`` blocks."""
    torch.manual_seed(seed)
    extras = {"qk_norm": True, "scale_heads": True, "scale_attn_inner": True} if custom else {}
    vision = CLIPVisionCfg(layers=depth, width=64, head_width=16, patch_size=8, image_size=32, **extras)
    text = CLIPTextCfg(context_length=16, vocab_size=64, width=32, heads=4, layers=depth, **extras)
    model = CLIP(32, vision, text)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # non-trivial biases, norms and head scales
    return model.eval()


def tiny_tokens(n: int = 3, context: int = 16, vocab: int = 64, seed: int = 3) -> torch.Tensor:
    """Token rows shaped like the tokenizer's: ids, then the EOT (the max id), then zeros."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, context, dtype=torch.long)
    for i, length in enumerate(torch.randint(3, context - 4, (n,), generator=g).tolist()):
        tokens[i, :length] = torch.randint(1, vocab - 1, (length,), generator=g)
        tokens[i, length] = vocab - 1
    return tokens


def randomize_adapters(model: nn.Module, seed: int = 2, std: float = 0.05) -> None:
    """Non-identity adapters: B is zero after patching, so fill A and B with noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)
