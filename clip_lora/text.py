"""Text encoding that skips the padding: exact for CLIP's causal, EOT-pooled text tower.

Each text token attends only to earlier tokens, and CLIP pools the feature of the
end-of-text token (the highest token id).  Tokens after the last EOT of a batch
therefore never influence the pooled features, and the 77-token context can be cut to
the longest prompt: "a photo of a {}." is about 8 tokens, so the text tower (which
dominates a CLIP-LoRA step on ImageNet's 1000 classes) does a fraction of the work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TEMPLATE = "a photo of a {}."


def _text_tower(model: nn.Module) -> SimpleNamespace | None:
    """The parts of a causal, EOT-pooled text tower, or None when trimming would not be exact."""
    if hasattr(model, "token_embedding") and hasattr(model, "positional_embedding"):
        # open_clip CLIP: the text tower's parts live on the model itself.
        parts = SimpleNamespace(
            embed=model.token_embedding,
            pos=model.positional_embedding,
            transformer=model.transformer,
            ln_final=model.ln_final,
            proj=model.text_projection,
            pool=model.text_pool_type,
            eos_id=getattr(model, "text_eos_id", None),
            mask=model.attn_mask,
        )
    else:
        text = getattr(model, "text", None)
        # A class token or a padding mask (CoCa, bidirectional towers) breaks the argument above.
        if text is None or not hasattr(text, "token_embedding") or text.cls_emb is not None or text.use_pad_mask:
            return None
        parts = SimpleNamespace(
            embed=text.token_embedding,
            pos=text.positional_embedding,
            transformer=text.transformer,
            ln_final=text.ln_final,
            proj=text.text_projection,
            pool=text.pool_type,
            eos_id=getattr(text, "eos_id", None),
            mask=text.attn_mask,
        )
    if parts.mask is None or parts.pool not in ("argmax", "eos"):
        return None
    return parts


def encode_text_trimmed(model: nn.Module, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``model.encode_text(tokens, normalize)``, running the text tower only up to the
    last end-of-text position in the batch.

    Works on patched and unpatched open_clip models.  Towers where trimming is not exact
    (bidirectional, class token, "first"/"last" pooling) fall back to ``encode_text``.
    """
    parts = _text_tower(model)
    if parts is None:
        return model.encode_text(tokens, normalize=normalize)
    if parts.pool == "argmax":
        eot = tokens.argmax(dim=-1)
    else:
        eot = (tokens == parts.eos_id).int().argmax(dim=-1)
    length = int(eot.max()) + 1  # one host sync per batch; it sets every shape below
    cast_dtype = parts.transformer.get_cast_dtype()
    x = parts.embed(tokens[:, :length]).to(cast_dtype) + parts.pos[:length].to(cast_dtype)
    # The sliced causal mask is still causal: LoRAAttention turns it into is_causal=True.
    x = parts.transformer(x, attn_mask=parts.mask[:length, :length])
    # LayerNorm is per token, so pooling before it gives the same features for less work.
    x = parts.ln_final(x[torch.arange(x.shape[0], device=x.device), eot])
    if isinstance(parts.proj, nn.Linear):
        x = parts.proj(x)
    elif parts.proj is not None:
        x = x @ parts.proj
    return F.normalize(x, dim=-1) if normalize else x


def class_prompts(classnames: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """The paper's prompts: ``template`` filled with each class name, ``_`` as a space."""
    return [template.format(name.replace("_", " ")) for name in classnames]


def encode_class_prompts(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    template: str = DEFAULT_TEMPLATE,
    normalize: bool = True,
) -> torch.Tensor:
    """Text features ``[n_classes, embed_dim]`` of the class prompts (unit norm by
    default: the classifier weights of CLIP's zero-shot head), through the trimmed tower."""
    device = next(model.parameters()).device
    tokens = tokenizer(class_prompts(classnames, template)).to(device)
    return encode_text_trimmed(model, tokens, normalize=normalize)
