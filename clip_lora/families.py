"""Which attention each CLIP tower has, and which of its Linears are q, k, v and o.

:func:`discover` turns one tower of an open_clip model into a :class:`Tower`: its
family, its attention blocks in depth order (what ``position`` counts) and its pooling
heads (adapted only with ``LoRAConfig(pooling_head=True)``).  Each block says how it
is adapted:

* ``"mha"``: open_clip's own transformer blocks (``nn.MultiheadAttention`` or open_clip's
  ``Attention``).  Both hold q/k/v as a bare ``in_proj_weight`` Parameter that their
  forward uses directly, so no Linear can be swapped; the whole attention is replaced by
  :class:`~clip_lora.attention.LoRAAttention`.
* ``"linears"``: every other family, whose attention calls its projection Linears; the
  Linears are replaced by :class:`~clip_lora.linear.LoRALinear` and the module's own code
  (rope, qk-norm, relative position bias, masks) runs unchanged.

Families (timm 1.0, open_clip 3.3, transformers 5):

==================  ===========================================  =============================
family              attention                                    projections (q, k, v / o)
==================  ===========================================  =============================
open_clip           ResidualAttentionBlock.attn                  in_proj_weight / out_proj
timm                timm ``Attention`` (SigLIP, SigLIP2,         qkv (3 slots) / proj
                    MobileCLIP-B/L, ViTamin, vit_*),
                    ``AttentionRope`` (PE-Core),
                    ``RelPosAttention``, Swin ``WindowAttention``
timm                ``EvaAttention`` (EVA01, EVA02)              qkv, or q_proj/k_proj/v_proj
                                                                 / proj
resnet              ``AttentionPool2d`` of ``ModifiedResNet``    q_proj/k_proj/v_proj / c_proj
hf                  Hugging Face self-attention (RoBERTa,        query/key/value, q/k/v or
                    XLM-R, mT5, NLLB)                            q_proj/k_proj/v_proj /
                                                                 output.dense, o or out_proj
==================  ===========================================  =============================

Pooling heads: SigLIP/PE-Core's ``AttentionPoolLatent`` (q on the latent, kv 2 slots,
proj) is a head after a full transformer tower, so it is off by default, like the
paper, which adapts the tower's blocks only.  A ResNet CLIP has no attention but its
``AttentionPool2d``, so there the pool IS the tower's (single) attention block: it is
adapted by default, ``position`` counts it as a 1-block tower (all / top1).

``transformers``' own ``CLIPModel`` and ``SiglipModel`` (not open_clip models) are found
the same way as the HF text towers, family ``transformers/<model_type>``.

Refused, naming the module and what to do instead: towers with no attention
(ConvNeXt), MobileCLIP-S*'s FastViT (convolutional stages and ``fastvit.Attention``
on conv feature maps), CoCa's ``AttentionalPooler`` as a pooling head.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .linear import LoRALinear
from .towers import find_towers

# A patched model still has its families: a swapped projection counts as its Linear.
_LINEAR = (nn.Linear, LoRALinear)


@dataclass
class Site:
    """One Linear to swap: ``getattr(parent, attr)``, whose output columns are ``slots``."""

    parent: nn.Module
    attr: str
    slots: tuple[str, ...]


@dataclass
class Block:
    """One attention of a tower.  ``kind`` "mha": replace ``parent.<attr>`` with
    LoRAAttention; "linears": swap ``sites``.  ``overrides`` are instance attributes set
    while patched (and removed by unpatch)."""

    name: str
    kind: str
    parent: nn.Module | None = None
    attr: str = "attn"
    sites: list[Site] = field(default_factory=list)
    overrides: list[tuple[nn.Module, str, object]] = field(default_factory=list)
    reason: str = ""  # kind "refused": why this head cannot be adapted


@dataclass
class Tower:
    family: str
    blocks: list[Block]
    heads: list[Block]


# =============================================================================
# Per-family projections
# =============================================================================


def _timm_attention_sites(attn: nn.Module) -> tuple[list[Site], list[tuple[nn.Module, str, object]]]:
    """q/k/v/o Linears of a timm attention module that calls them (qkv packed or split)."""
    overrides = []
    if isinstance(getattr(attn, "qkv", None), _LINEAR):
        sites = [Site(attn, "qkv", ("q", "k", "v"))]
        if getattr(attn, "q_bias", None) is not None:
            # EvaAttention with separate q/v biases (EVA01, EVA02-E) calls F.linear on
            # qkv.weight directly, bypassing the Linear; qkv_bias_separate=True is timm's
            # own equivalent path that calls qkv(x) and adds the biases after it.
            overrides.append((attn, "qkv_bias_separate", True))
    elif all(isinstance(getattr(attn, n, None), _LINEAR) for n in ("q_proj", "k_proj", "v_proj")):
        sites = [Site(attn, "q_proj", ("q",)), Site(attn, "k_proj", ("k",)), Site(attn, "v_proj", ("v",))]
    else:
        raise ValueError(f"{type(attn).__qualname__} has neither a qkv Linear nor q_proj/k_proj/v_proj Linears")
    if not isinstance(getattr(attn, "proj", None), _LINEAR):
        raise ValueError(f"{type(attn).__qualname__} has no proj Linear")
    return [*sites, Site(attn, "proj", ("o",))], overrides


def _timm_attention_types() -> tuple[type, ...]:
    """timm attention classes whose forward calls qkv/q_proj.../proj (checked against timm 1.0.31)."""
    from timm.layers.attention import Attention, AttentionRope
    from timm.models.eva import EvaAttention
    from timm.models.swin_transformer import WindowAttention
    from timm.models.vision_transformer_relpos import RelPosAttention

    return (Attention, AttentionRope, EvaAttention, WindowAttention, RelPosAttention)


def _refuse(where: str, module: nn.Module, why: str, instead: str) -> ValueError:
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    return ValueError(f"{where} ({kind}) cannot be adapted: {why}; {instead}")


def _timm_tower(visual: nn.Module, prefix: str) -> Tower:
    trunk = visual.trunk
    supported = _timm_attention_types()
    blocks, other_attention = [], []
    for name, module in trunk.named_modules():
        if isinstance(module, supported):
            sites, overrides = _timm_attention_sites(module)
            blocks.append(Block(f"{prefix}.trunk.{name}", "linears", sites=sites, overrides=overrides))
        elif type(module).__name__.endswith("Attention") and not isinstance(module, nn.MultiheadAttention):
            other_attention.append(type(module).__qualname__)
    if other_attention or not blocks:
        why = (
            f"its attention is {sorted(set(other_attention))[0]} inside convolutional stages"
            if other_attention
            else "it has no attention layers (a convolutional network)"
        )
        raise _refuse(
            f"vision tower {prefix}.trunk", trunk, why,
            "CLIP-LoRA adapts attention projections only; use encoder='text' to adapt its text tower",
        )
    heads = []
    pool = getattr(trunk, "attn_pool", None)
    if pool is not None:
        from timm.layers.attention_pool import AttentionPoolLatent

        if isinstance(pool, AttentionPoolLatent):
            sites = [Site(pool, "q", ("q",)), Site(pool, "kv", ("k", "v")), Site(pool, "proj", ("o",))]
            heads.append(Block(f"{prefix}.trunk.attn_pool", "linears", sites=sites))
    return Tower(f"timm/{type(trunk).__name__}", blocks, heads)


def _attention_pool2d_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip ``AttentionPool2d.forward`` with the projections called as modules.

    The original passes ``q_proj.weight``... to ``F.multi_head_attention_forward``, so
    swapped Linears would never run.  This is the same computation, step by step as
    torch's MHA does it with ``need_weights=False`` (separate projections, SDPA, output
    projection), so an unadapted pool gives the same features."""
    x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3]).permute(2, 0, 1)  # NCHW -> (HW)NC
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    x = x + self.positional_embedding[:, None, :].to(x.dtype)
    length, n, d = x.shape
    heads = self.num_heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(length, n * heads, d // heads).transpose(0, 1).reshape(n, heads, length, d // heads)

    q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
    out = F.scaled_dot_product_attention(q, k, v)
    out = out.permute(2, 0, 1, 3).reshape(length * n, d)
    return self.c_proj(out).reshape(length, n, -1)[0]


def _resnet_tower(visual: nn.Module, prefix: str) -> Tower:
    pool = visual.attnpool
    sites = [
        Site(pool, "q_proj", ("q",)), Site(pool, "k_proj", ("k",)), Site(pool, "v_proj", ("v",)),
        Site(pool, "c_proj", ("o",)),
    ]
    forward = types.MethodType(_attention_pool2d_forward, pool)
    block = Block(f"{prefix}.attnpool", "linears", sites=sites, overrides=[(pool, "forward", forward)])
    return Tower("resnet", [block], [])


_Q, _K, _V = ("query", "q_proj", "q"), ("key", "k_proj", "k"), ("value", "v_proj", "v")
_O = ("out_proj", "o")


def _linear_child(module: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(module, n, None), _LINEAR)), None)


def _hf_blocks(root: nn.Module, prefix: str) -> list[Block]:
    """Self-attention of a Hugging Face encoder: any module with q, k and v Linear children
    (by the names BERT/RoBERTa, T5, BART/M2M100 and CLIP/SigLIP use); its output
    projection is a sibling Linear, or ``<parent>.output.dense`` in BERT-style models."""
    blocks = []
    modules = dict(root.named_modules())
    for name, module in modules.items():
        names = [_linear_child(module, group) for group in (_Q, _K, _V)]
        if None in names:
            continue
        sites = [Site(module, n, (s,)) for n, s in zip(names, ("q", "k", "v"), strict=True)]
        o = _linear_child(module, _O)
        if o is not None:
            sites.append(Site(module, o, ("o",)))
        else:
            output = getattr(modules.get(name.rpartition(".")[0]), "output", None)
            if not isinstance(getattr(output, "dense", None), _LINEAR):
                raise _refuse(f"{prefix}.{name}", module, "its output projection was not found",
                              "use params without 'o'")
            sites.append(Site(output, "dense", ("o",)))
        blocks.append(Block(f"{prefix}.{name}", "linears", sites=sites))
    return blocks


def _hf_tower(text: nn.Module, prefix: str) -> Tower:
    """An open_clip ``HFTextEncoder``: the HF model sits at ``text.transformer``."""
    blocks = _hf_blocks(text.transformer, f"{prefix}.transformer")
    if not blocks:
        raise _refuse(f"text tower {prefix}", text.transformer, "no self-attention with q/k/v Linears was found",
                      "use encoder='vision'")
    return Tower(f"hf/{getattr(text.config, 'model_type', type(text.transformer).__name__)}", blocks, [])


def _open_clip_tower(transformer: nn.Module, prefix: str, heads: list[Block]) -> Tower:
    blocks = [Block(f"{prefix}.resblocks.{i}.attn", "mha", parent=b) for i, b in enumerate(transformer.resblocks)]
    return Tower("open_clip", blocks, heads)


# =============================================================================
# Entry point
# =============================================================================


def _transformers_tower(model: nn.Module, tower: str) -> Tower:
    """``transformers``' ``CLIPModel`` / ``SiglipModel``: ``vision_model`` and ``text_model``
    with q_proj/k_proj/v_proj/out_proj Linears.  SigLIP's vision pooling head runs an
    ``nn.MultiheadAttention`` from a learnt probe (cross-attention): refused as a head."""
    root = getattr(model, f"{tower}_model")
    blocks = _hf_blocks(root, f"{tower}_model")
    if not blocks:
        raise _refuse(f"{tower}_model", root, "no self-attention with q/k/v Linears was found",
                      f"choose encoder={'text' if tower == 'vision' else 'vision'!r}")
    heads = []
    head = getattr(root, "head", None)
    if head is not None and any(isinstance(m, nn.MultiheadAttention) for m in head.modules()):
        reason = "it cross-attends from a learnt probe through nn.MultiheadAttention"
        heads.append(Block(f"{tower}_model.head", "refused", parent=root, attr="head", reason=reason))
    return Tower(f"transformers/{model.config.model_type}", blocks, heads)


def discover(model: nn.Module, tower: str) -> Tower:
    """The :class:`Tower` of ``model``'s ``tower`` ("vision" or "text"), or a ValueError
    that names the module type and what to do."""
    if tower not in ("vision", "text"):
        raise ValueError(f"tower must be 'vision' or 'text', got {tower!r}")
    if hasattr(model, "vision_model") and hasattr(model, "text_model") and hasattr(model, "config"):
        return _transformers_tower(model, tower)
    transformer = find_towers(model)[tower]
    if tower == "vision":
        visual = getattr(model, "visual", None)
        if visual is None:
            raise ValueError(f"{type(model).__name__} has no .visual tower; choose encoder='text'")
        if transformer is not None:
            heads = []
            if getattr(visual, "attn_pool", None) is not None:
                reason = "its attention has key/value widths other than its query's"
                heads.append(Block("visual.attn_pool", "refused", parent=visual, attr="attn_pool", reason=reason))
            return _open_clip_tower(transformer, "visual.transformer", heads)
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.timm_model import TimmModel

        if isinstance(visual, ModifiedResNet):
            return _resnet_tower(visual, "visual")
        if isinstance(visual, TimmModel):
            return _timm_tower(visual, "visual")
        raise _refuse("vision tower visual", visual, "no supported attention", "choose encoder='text'")
    if transformer is not None:
        prefix = "transformer" if getattr(model, "transformer", None) is transformer else "text.transformer"
        return _open_clip_tower(transformer, prefix, [])
    text = getattr(model, "text", None)
    if text is not None and type(text).__name__ == "HFTextEncoder":
        return _hf_tower(text, "text")
    raise _refuse("text tower", text if text is not None else model, "no supported attention",
                  "choose encoder='vision'")


def families(model: nn.Module) -> dict[str, str]:
    """``{"text": family, "vision": family}`` for the towers that can be adapted."""
    out = {}
    for t in ("text", "vision"):
        try:
            out[t] = discover(model, t).family
        except ValueError:
            pass
    return out
