"""Frozen towers stored in the compute dtype (fp16 / bf16 training).

Under ``torch.autocast`` every frozen Linear and conv weight is cast from fp32 on every
call, forward and backward: about 124 M parameters per step on ViT-B/16.  Storing them
once in the autocast dtype removes those casts and halves their memory.

What it changes numerically, under autocast: **nothing**.  Autocast rounds an fp32
weight to the half type with ``.to(dtype)`` (round to nearest even) on every call; the
stored copy is that very rounding, done once, and :func:`lora_kernels.lora_linear`'s own
``weight.to(dtype)`` is then a no-op.  The LayerNorms, embeddings, the two projection
matrices (``text_projection``, ``visual.proj``) and the LoRA masters stay fp32, and so
does the residual stream (see :func:`_cast_dtype_weights`), so the logits are bitwise
those of the fp32-stored model under the same autocast (``tests/test_half_towers.py``).
Against the fp32 model without autocast the difference is autocast's own: the half
type's rounding (bf16 about 1e-2 relative on zero-shot logits, fp16 about 1e-3).

Outside autocast the half weights meet fp32 activations and the layers raise a dtype
error: a half-stored model is run under ``torch.autocast`` (training and
:func:`clip_lora.evaluate.evaluate` always do).

Adapters are unaffected (fp32 masters; ``save_adapter`` writes exactly what it writes
for an fp32 model).  Merging into half weights rounds ``W + ΔW`` to the half type, as
merging into any half model does; for the exact fp32 merged state dict keep the fp32
originals (``keep_fp32=True``) and call :func:`restore_fp32` first.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_ORIGINALS_ATTR = "_clip_lora_fp32_frozen"
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _cast_dtype_weights(model: nn.Module) -> set[int]:
    """The weights open_clip reads a transformer's "cast dtype" from, to leave in fp32.

    ``Transformer.get_cast_dtype()`` is ``resblocks[0].mlp.c_fc.weight.dtype``, and the
    text tower casts its token and positional embeddings to it.  A half c_fc would turn
    the residual stream half as well (open_clip's pure-fp16 mode), which autocast does
    not do; keeping this one Linear per tower in fp32 (1 M of ViT-B/16's 124 M frozen
    projection weights in the text tower, 2.4 M in the vision tower) keeps the stream
    fp32 and the result bitwise unchanged.
    """
    keep = set()
    for module in model.modules():
        blocks = getattr(module, "resblocks", None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) and hasattr(module, "get_cast_dtype"):
            c_fc = getattr(getattr(blocks[0], "mlp", None), "c_fc", None)
            if isinstance(c_fc, nn.Linear):
                keep.add(id(c_fc.weight))
    return keep


def frozen_projection_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Frozen Linear and conv weights and biases, and packed attention projections
    (``in_proj_weight``/``in_proj_bias``), by name; what :func:`store_frozen_half` casts."""
    keep = _cast_dtype_weights(model)
    out: dict[str, nn.Parameter] = {}
    for mod_name, module in model.named_modules():
        names: tuple[str, ...] = ()
        if isinstance(module, (nn.Linear, *_CONVS)):
            names = ("weight", "bias")
        elif isinstance(getattr(module, "in_proj_weight", None), nn.Parameter):
            names = ("in_proj_weight", "in_proj_bias")  # nn.MultiheadAttention, open_clip Attention, LoRAAttention
        for n in names:
            p = module._parameters.get(n)
            if p is not None and not p.requires_grad and id(p) not in keep and p.is_floating_point():
                out[f"{mod_name}.{n}" if mod_name else n] = p
    return out


def resolve_storage(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The half dtype that ``precision`` trains in on ``device`` (None: fp32, nothing to store).

    Same resolution as :func:`clip_lora.evaluate.resolve_precision` ("auto" is fp16 on
    CUDA; fp16 on CPU runs fp32), without repeating its warning.
    """
    from .evaluate import resolve_precision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resolved = resolve_precision(precision, torch.device(device))
    return HALF_DTYPES.get(resolved)


@torch.no_grad()
def store_frozen_half(model: nn.Module, dtype: torch.dtype | None, *, keep_fp32: bool = False) -> nn.Module:
    """Store the frozen projection weights of ``model`` in ``dtype`` (fp16 or bf16), in place.

    Only parameters with ``requires_grad=False`` are cast (patch LoRA first: patching
    freezes the towers), so trainable tensors keep their fp32 masters.  The Parameter
    objects stay the same (only their data changes), so optimisers and patched modules
    keep their references.  ``dtype=None`` does nothing.  ``keep_fp32`` keeps an exact
    fp32 copy on the host for :func:`restore_fp32`.  Returns ``model``.
    """
    if dtype is None:
        return model
    if dtype not in HALF_DTYPES.values():
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16 (or None for fp32), got {dtype}")
    weights = frozen_projection_weights(model)
    originals = getattr(model, _ORIGINALS_ATTR, {})
    for name, p in weights.items():
        if keep_fp32 and p.dtype == torch.float32 and name not in originals:
            originals[name] = p.detach().to("cpu", copy=True)
        p.data = p.data.to(dtype)
    if keep_fp32:
        setattr(model, _ORIGINALS_ATTR, originals)
    return model


@torch.no_grad()
def restore_fp32(model: nn.Module) -> nn.Module:
    """Undo :func:`store_frozen_half` exactly, from the copy ``keep_fp32=True`` kept."""
    originals = getattr(model, _ORIGINALS_ATTR, None)
    if originals is None:
        raise ValueError(
            "no fp32 originals on this model: store_frozen_half(..., keep_fp32=True) keeps them; "
            "otherwise reload the fp32 weights (e.g. clip_lora.load_base_state_dict)"
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = sorted(set(originals) - set(params))
    if missing:
        raise ValueError(f"the model no longer has the stored weights {missing[:3]}; was it re-patched?")
    for name, value in originals.items():
        params[name].data = value.to(params[name].device)
    delattr(model, _ORIGINALS_ATTR)
    return model


def frozen_dtypes(model: nn.Module) -> dict[torch.dtype, int]:
    """Element count per dtype over all parameters (for logs and tests)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return counts
