"""``LoRAAttention``: a drop-in replacement for the self-attention of an open_clip block.

open_clip builds attention in two forms, and this module stands in for both:

* ``nn.MultiheadAttention`` inside ``ResidualAttentionBlock`` (called as
  ``attn(q, k, v, need_weights=False, attn_mask=...)`` and returning ``(out, None)``);
* open_clip's own ``Attention`` inside ``CustomResidualAttentionBlock`` (called as
  ``attn(x, attn_mask=...)`` and returning ``out``).

Why a whole-module replacement here, when every other family only has its projection
Linears swapped (:class:`~clip_lora.linear.LoRALinear`, :mod:`clip_lora.families`): both
forms keep q/k/v packed in a bare ``in_proj_weight [3d, d]`` Parameter that their forward
hands straight to ``F.multi_head_attention_forward`` / ``F.linear``; there is no Linear
call to intercept.  The replacement computes the packed
projection as ONE :func:`lora_kernels.lora_linear` call with three slots (q, k, v; an
unadapted slot is ``None``), attention with ``F.scaled_dot_product_attention``, and the
output projection through ``lora_linear`` when "o" is adapted (``F.linear`` otherwise).

The frozen tensors are the original ``Parameter`` objects under the original names
(``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``, plus
``ln_q``/``ln_k``/``ln_inner``/``head_scale`` of the ``Attention`` form), so open_clip
state-dict keys are unchanged; the adapters are extra keys ``lora_A.<p>`` ``[r, d]`` and
``lora_B.<p>`` ``[d, r]`` for ``p`` in q, k, v, o.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_kernels

from .slots import SlotAdapters

QKV = ("q", "k", "v")
PROVIDERS = ("fused", "plain")


# =============================================================================
# Causal-mask detection: the text tower passes a materialised [L, L] -inf mask
# =============================================================================


class _CausalMemo:
    """Remembers the verdict for the last mask object seen.

    open_clip hands every block the same mask tensor, so the content check (a host sync
    on GPU) runs once per mask object, not once per block and step.  A weak reference
    plus the tensor's version counter make a stale verdict impossible.
    """

    ref: weakref.ref | None = None
    version: int = -1
    verdict: bool = False


def is_causal_mask(mask: torch.Tensor | None, seq_len: int) -> bool:
    """True when ``mask`` is exactly the causal mask for ``seq_len`` tokens: additive with
    -inf strictly above the diagonal and 0 elsewhere, or boolean True above it."""
    if mask is None or mask.dim() != 2 or tuple(mask.shape) != (seq_len, seq_len):
        return False
    if torch.compiler.is_compiling():
        return False  # no data-dependent branch in a graph; the explicit mask is still exact
    if _CausalMemo.ref is not None and _CausalMemo.ref() is mask and _CausalMemo.version == mask._version:
        return _CausalMemo.verdict
    upper = torch.ones(seq_len, seq_len, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        verdict = torch.equal(mask, upper)
    else:
        expected = torch.zeros(seq_len, seq_len, dtype=mask.dtype, device=mask.device).masked_fill(upper, -math.inf)
        verdict = torch.equal(mask, expected)
    _CausalMemo.ref, _CausalMemo.version, _CausalMemo.verdict = weakref.ref(mask), mask._version, verdict
    return verdict


def _sdpa_mask(mask: torch.Tensor | None, n: int, heads: int, seq_len: int, dtype: torch.dtype):
    """open_clip's mask conventions (bool True = blocked, float = additive, 3-D = per
    batch·head) turned into what SDPA takes (bool True = attend, broadcastable 4-D)."""
    if mask is None:
        return None
    if mask.dim() == 3:
        mask = mask.reshape(n, heads, seq_len, seq_len)
    return ~mask if mask.dtype == torch.bool else mask.to(dtype)


# =============================================================================
# The module
# =============================================================================


def _attention_form(attn: nn.Module) -> str:
    """ "mha" or "attention"; raises for anything this module cannot stand in for exactly."""
    from open_clip.transformer import Attention  # open_clip only where CLIP is touched

    if isinstance(attn, nn.MultiheadAttention):
        unsupported = {
            "separate q/k/v weights (kdim/vdim != embed_dim)": not attn._qkv_same_embed_dim,
            "bias_k/bias_v": attn.bias_k is not None,
            "add_zero_attn": attn.add_zero_attn,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"nn.MultiheadAttention with {', '.join(bad)} is not supported by LoRAAttention")
        return "mha"
    if isinstance(attn, Attention):
        if attn.logit_scale is not None:
            raise ValueError(
                "open_clip Attention with scaled_cosine=True is not supported: its cosine logits do not "
                "map onto scaled_dot_product_attention; build the model without scaled_cosine_attn"
            )
        return "attention"
    raise TypeError(
        f"cannot patch attention module of type {type(attn).__module__}.{type(attn).__qualname__}; "
        "supported: torch.nn.MultiheadAttention and open_clip.transformer.Attention"
    )


class MergeableLoRA(nn.Module):
    """Merge/unmerge shared by :class:`LoRAAttention` and :class:`~clip_lora.linear.LoRALinear`.

    A subclass has ``scale``, ``dropout``, ``provider``, ``lora_A``/``lora_B``
    (:class:`~clip_lora.slots.SlotAdapters`), ``_layouts`` (``{slots: SlotLayout}`` for
    each packed projection), ``merged``, ``_unmerged`` (a dict) and ``_targets()``:
    ``{name: (frozen weight, its rows)}``.
    """

    def _lora_projection(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, names: tuple[str, ...]
    ) -> torch.Tensor:
        """``x Wᵀ + b`` plus the adapters of slots ``names`` (output slot s is ``names[s]``),
        through the module's provider.  A fresh dropout seed per call: q/k/v (one call,
        per-slot masks), o and every other projection never share a mask."""
        p = self.dropout if self.training else 0.0
        layout = self._layouts.get(names) if self.provider == "fused" else None
        if layout is not None:
            # The per-step path: adapters already packed, layout checked at construction.
            seed = lora_kernels.draw_seed(x.device) if p > 0 else None
            # The submodules from the module's own dict: nn.Module.__getattr__ costs ~0.6 µs
            # a lookup, on every call (python -m bench.host_path, LoRALinear rows).
            lora_a, lora_b = self._modules["lora_A"].packed(names), self._modules["lora_B"].packed(names)
            return lora_kernels.lora_linear_packed(
                x, weight, bias, lora_a=lora_a, lora_b=lora_b, layout=layout, scale=self.scale, dropout_p=p, seed=seed
            )
        lora_a = [self.lora_A[n] if n in self.lora_A else None for n in names]
        lora_b = [self.lora_B[n] if n in self.lora_B else None for n in names]
        if self.provider == "plain":
            return lora_kernels.plain_lora_linear(
                x, weight, bias, lora_a=lora_a, lora_b=lora_b, scale=self.scale, dropout_p=p, training=self.training
            )
        seed = lora_kernels.draw_seed(x.device) if p > 0 else None
        return lora_kernels.lora_linear(
            x, weight, bias, lora_a=lora_a, lora_b=lora_b, scale=self.scale, dropout_p=p, seed=seed
        )

    def delta(self, name: str) -> torch.Tensor:
        """``scale · B A`` of projection ``name`` (fp32): what merging adds to its weight rows."""
        return self.scale * (self.lora_B[name].detach().float() @ self.lora_A[name].detach().float())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``scale·B A`` into the frozen weights; forward then runs plain GEMMs.  The
        original rows are kept so :meth:`unmerge` restores them bit for bit."""
        if self.merged:
            return
        for p, (weight, rows) in self._targets().items():
            self._unmerged[p] = weight[rows].clone()
            weight[rows] = (weight[rows].float() + self.delta(p)).to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` exactly (restores the saved rows, no subtraction)."""
        if not self.merged:
            return
        for p, (weight, rows) in self._targets().items():
            weight[rows] = self._unmerged.pop(p).to(device=weight.device, dtype=weight.dtype)
        self.merged = False


class LoRAAttention(MergeableLoRA):
    """Self-attention with LoRA on the chosen projections (see the module docstring).

    Args:
        attn: the ``nn.MultiheadAttention`` or open_clip ``Attention`` to stand in for;
            its frozen parameters are shared, not copied, and it is kept (unregistered)
            for :meth:`original`.
        params: adapted projections, any of "q", "k", "v", "o".
        r: adapter rank.
        scale: factor on the adapter output.
        dropout: LoRA dropout on the adapter input (training mode only); every call
            draws a fresh seed, and each slot's mask is independent.
        provider: "fused" (:func:`lora_kernels.lora_linear`) or "plain"
            (:func:`lora_kernels.plain_lora_linear`, the PEFT-style reference).
    """

    def __init__(
        self,
        attn: nn.Module,
        *,
        params: Sequence[str],
        r: int,
        scale: float,
        dropout: float,
        provider: str = "fused",
    ) -> None:
        super().__init__()
        self.form = _attention_form(attn)
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
        bad = [p for p in params if p not in (*QKV, "o")]
        if bad or not params:
            raise ValueError(f"params must be a non-empty subset of q, k, v, o; got {list(params)}")
        self.provider = provider
        self.params = tuple(p for p in (*QKV, "o") if p in params)
        self.r, self.scale, self.dropout = int(r), float(scale), float(dropout)
        self.embed_dim = attn.in_proj_weight.shape[1]
        self.num_heads = attn.num_heads
        self.batch_first = attn.batch_first if self.form == "mha" else True
        self.attn_dropout = float(attn.dropout if self.form == "mha" else attn.attn_drop.p)

        # The original objects under the original names: state-dict compatible, no copy.
        self.in_proj_weight = attn.in_proj_weight
        self.in_proj_bias = attn.in_proj_bias
        self.out_proj = attn.out_proj
        if self.form == "attention":
            self.ln_q, self.ln_k, self.ln_inner = attn.ln_q, attn.ln_k, attn.ln_inner
            self.head_scale = attn.head_scale
            self.out_drop = attn.out_drop
        # A tuple hides the original from .modules()/.state_dict(); unpatch puts it back.
        self._original = (attn,)

        device = attn.in_proj_weight.device
        d = self.embed_dim
        # The fused provider keeps q/k/v's adapters packed (one A and one B Parameter when
        # all three are adapted): no per-call cat, two autograd leaves (clip_lora.slots).
        # The plain baseline keeps one Parameter per projection, as PEFT does.
        groups, names = (QKV, ("o",)), (*QKV, "o")
        packed = provider == "fused"
        self.lora_A = SlotAdapters(
            groups, self.params, dict.fromkeys(names, self.r), d, packed=packed, init="kaiming", device=device
        )
        self.lora_B = SlotAdapters(
            groups, self.params, dict.fromkeys(names, d), self.r, packed=packed, init="zeros", device=device
        )
        # Checked once here; each call checks only shapes, dtypes and devices.
        self._layouts = {
            g: lora_kernels.slot_layout(d, [d] * len(g), self.r) for g in groups if self.lora_A.packed(g) is not None
        }
        self.merged = False
        self._unmerged: dict[str, torch.Tensor] = {}
        self.train(attn.training)  # a patched eval model stays in eval mode

    # -- projections ---------------------------------------------------------

    def _project(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, names: tuple[str, ...]):
        """One (possibly packed) projection; slot s of the output belongs to ``names[s]``."""
        if self.merged or not any(n in self.lora_A for n in names):
            return F.linear(x, weight, bias)
        return self._lora_projection(x, weight, bias, names)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        """Self-attention of ``query``; accepts both open_clip call signatures.

        Returns ``(out, None)`` in place of ``nn.MultiheadAttention`` and ``out`` in place
        of open_clip's ``Attention``.
        """
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise NotImplementedError("LoRAAttention handles self-attention only (key and value must be the query)")
        if key_padding_mask is not None:
            raise NotImplementedError("key_padding_mask is not supported; open_clip blocks never pass one")
        if need_weights:
            raise NotImplementedError("need_weights=True is not supported: attention runs in fused SDPA")
        x = query if self.batch_first else query.transpose(0, 1)
        n, seq_len, d = x.shape
        heads = self.num_heads
        qkv = self._project(x, self.in_proj_weight, self.in_proj_bias, QKV)
        q, k, v = qkv.unflatten(-1, (3, heads, d // heads)).permute(2, 0, 3, 1, 4).unbind(0)  # [N, H, L, hd]
        if self.form == "attention":
            q, k = self.ln_q(q), self.ln_k(k)
        # The causal mask as is_causal: same result, and SDPA skips the masked half.
        causal = is_causal or is_causal_mask(attn_mask, seq_len)
        mask = None if causal else _sdpa_mask(attn_mask, n, heads, seq_len, q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=causal
        )
        if self.form == "attention" and self.head_scale is not None:
            out = out * self.head_scale
        out = out.transpose(1, 2).reshape(n, seq_len, d)
        if self.form == "attention":
            out = self.ln_inner(out)
        out = self._project(out, self.out_proj.weight, self.out_proj.bias, ("o",))
        if self.form == "attention":
            return self.out_drop(out)
        out = out if self.batch_first else out.transpose(0, 1)
        return out, None

    # -- merge / unmerge / unpatch -------------------------------------------

    def _targets(self) -> dict[str, tuple[torch.Tensor, slice]]:
        d = self.embed_dim
        rows = {"q": slice(0, d), "k": slice(d, 2 * d), "v": slice(2 * d, 3 * d)}
        return {
            p: (self.out_proj.weight, slice(None)) if p == "o" else (self.in_proj_weight, rows[p]) for p in self.params
        }

    def merged_weights(self) -> dict[str, torch.Tensor]:
        """The frozen weights with the adapters folded in, keyed by their parameter names;
        the module is not changed."""
        out: dict[str, torch.Tensor] = {}
        if self.merged:
            # Copies: unmerge() restores these very tensors in place.
            return {
                "in_proj_weight": self.in_proj_weight.detach().clone(),
                "out_proj.weight": self.out_proj.weight.detach().clone(),
            }
        for p, (weight, rows) in self._targets().items():
            key = "out_proj.weight" if p == "o" else "in_proj_weight"
            w = out.setdefault(key, weight.detach().clone())
            w[rows] = (w[rows].float() + self.delta(p)).to(w.dtype)
        return out

    def original(self) -> nn.Module:
        """The module this one replaced, with the current (unmerged) frozen weights."""
        self.unmerge()
        attn = self._original[0]
        attn.in_proj_weight = self.in_proj_weight
        if self.in_proj_bias is not None:
            attn.in_proj_bias = self.in_proj_bias
        attn.out_proj = self.out_proj
        if self.form == "attention":
            attn.ln_q, attn.ln_k, attn.ln_inner, attn.out_drop = self.ln_q, self.ln_k, self.ln_inner, self.out_drop
            if self.head_scale is not None:
                attn.head_scale = self.head_scale
        attn.train(self.training)
        return attn

    def extra_repr(self) -> str:
        return (
            f"form={self.form}, embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"params={','.join(self.params)}, r={self.r}, scale={self.scale:.4g}, dropout={self.dropout}, "
            f"provider={self.provider}, merged={self.merged}"
        )
