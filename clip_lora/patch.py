"""Swap LoRA attention into an open_clip model, and undo it.

``patch_fused(model, config)`` adapts the attention of the blocks that ``config``
selects (:mod:`clip_lora.families` says, per tower family, which modules those are):
open_clip's own attention is replaced by :class:`~clip_lora.attention.LoRAAttention`,
the projection Linears of every other family by :class:`~clip_lora.linear.LoRALinear`.
It freezes every other parameter
and records the config as ``model.clip_lora_config``.  ``unpatch`` puts the original
modules back.  ``merge``/``unmerge`` fold the adapters into the frozen weights and out
again.

State dicts: a patched model has the open_clip keys plus ``….lora_A.<p>`` /
``….lora_B.<p>`` on each patched module.  :func:`load_base_state_dict` loads a plain open_clip checkpoint
into a patched model (only LoRA keys may be missing); :func:`merged_state_dict` gives a
plain open_clip state dict with the adapters folded in, which an unpatched model loads
with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
import torch.nn as nn

from .attention import LoRAAttention
from .config import LoRAConfig
from .families import discover
from .linear import LoRALinear

CONFIG_ATTR = "clip_lora_config"
PROVIDER_ATTR = "clip_lora_provider"
_REQUIRES_GRAD_ATTR = "_clip_lora_requires_grad"


LoRAModule = LoRAAttention | LoRALinear


class Plan(NamedTuple):
    swaps: list[tuple[nn.Module, str, LoRAModule]]
    overrides: list[tuple[nn.Module, str, object]]

_OVERRIDES_ATTR = "_clip_lora_overrides"
_MISSING = object()


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRAModule]]:
    """``(qualified name, module)`` of every patched attention or Linear, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, (LoRAAttention, LoRALinear)):
            yield name, module


def is_lora_key(key: str) -> bool:
    """Whether a state-dict key belongs to an adapter rather than to open_clip."""
    return ".lora_A." in key or ".lora_B." in key


def plan_patch(model: nn.Module, config: LoRAConfig, provider: str) -> Plan:
    """What patching would install, built without touching ``model``: ``swaps``, the
    ``(parent, attr, new module)`` for every adapted attention or projection, and the
    instance ``overrides`` some families need.  An unsupported block, or a caller's later
    check (an adapter file that does not fit), leaves the model intact."""
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a clip_lora.LoRAConfig, got {type(config).__name__}")
    if next(lora_modules(model), None) is not None:
        raise ValueError("model is already patched; call clip_lora.unpatch(model) first")
    kwargs = {"r": config.r, "scale": config.scale, "dropout": config.dropout, "provider": provider}
    swaps, overrides = [], []
    for tower_name in config.towers:
        tower = discover(model, tower_name)
        chosen = [tower.blocks[i] for i in config.blocks(len(tower.blocks))]
        if config.pooling_head:
            refused = [h for h in tower.heads if h.kind == "refused"]
            if refused:
                head = getattr(refused[0].parent, refused[0].attr)
                raise ValueError(
                    f"pooling head {refused[0].name} ({type(head).__qualname__}) cannot be adapted: "
                    f"{refused[0].reason}; use pooling_head=False"
                )
            chosen += tower.heads
        for block in chosen:
            if block.kind == "mha":
                # open_clip's attention keeps q/k/v in a bare in_proj_weight: replace it whole.
                attn = LoRAAttention(getattr(block.parent, block.attr), params=config.params, **kwargs)
                swaps.append((block.parent, block.attr, attn))
                continue
            sites = [s for s in block.sites if set(s.slots) & set(config.params)]
            for s in sites:
                linear = LoRALinear(getattr(s.parent, s.attr), slots=s.slots, params=config.params, **kwargs)
                swaps.append((s.parent, s.attr, linear))
            if sites:
                overrides += block.overrides
    return Plan(swaps, overrides)


def apply_patch(model: nn.Module, plan: Plan, config: LoRAConfig, provider: str) -> nn.Module:
    """Install :func:`plan_patch`'s plan (cannot fail half-way: no checks left)."""
    setattr(model, _REQUIRES_GRAD_ATTR, {n: p.requires_grad for n, p in model.named_parameters()})
    saved = []
    for module, attr, value in plan.overrides:
        saved.append((module, attr, module.__dict__.get(attr, _MISSING)))
        setattr(module, attr, value)
    setattr(model, _OVERRIDES_ATTR, saved)
    for parent, attr, new in plan.swaps:
        setattr(parent, attr, new)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    setattr(model, CONFIG_ATTR, config)
    setattr(model, PROVIDER_ATTR, provider)
    return model


def _patch(model: nn.Module, config: LoRAConfig, provider: str) -> nn.Module:
    return apply_patch(model, plan_patch(model, config, provider), config, provider)


def patch_fused(model: nn.Module, config: LoRAConfig | None = None) -> nn.Module:
    """Patch ``model`` in place with fused-kernel LoRA attention; returns it.

    Only the adapters stay trainable.  The attention of the ``config.position`` blocks
    of the ``config.encoder`` towers is replaced; q/k/v run as one packed
    :func:`lora_kernels.lora_linear` call.
    """
    return _patch(model, config or LoRAConfig(), "fused")


def patch_reference(model: nn.Module, config: LoRAConfig | None = None) -> nn.Module:
    """Like :func:`patch_fused`, with the PEFT-style plain PyTorch LoRA
    (:func:`lora_kernels.plain_lora_linear`): the baseline and the numerical reference."""
    return _patch(model, config or LoRAConfig(), "plain")


def unpatch(model: nn.Module) -> nn.Module:
    """Put the original attention modules back (unmerging first) and restore each
    parameter's ``requires_grad`` from before patching.  The adapters are dropped."""
    for name, module in list(lora_modules(model)):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.original())
    for module, attr, old in reversed(getattr(model, _OVERRIDES_ATTR, [])):
        if old is _MISSING:
            delattr(module, attr)
        else:
            setattr(module, attr, old)
    flags = getattr(model, _REQUIRES_GRAD_ATTR, {})
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, p.requires_grad))
    for attr in (CONFIG_ATTR, PROVIDER_ATTR, _REQUIRES_GRAD_ATTR, _OVERRIDES_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its frozen weight (zero-overhead inference)."""
    for _, module in lora_modules(model):
        module.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`, restoring the frozen weights exactly."""
    for _, module in lora_modules(model):
        module.unmerge()
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter parameter (A then B per module): what the optimiser trains.  With the
    fused provider a packed projection's slots are one Parameter (clip_lora.slots); use
    :func:`lora_grads` for per-slot gradients."""
    return [p for _, m in lora_modules(model) for d in (m.lora_A, m.lora_B) for p in d.parameters()]


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """The gradient of every adapter tensor, under its state-dict key (as
    :func:`lora_state_dict`), whether the module stores its slots packed or apart."""
    return {
        f"{name}.{kind}.{p}": getattr(m, kind).grad(p)
        for name, m in lora_modules(model)
        for kind in ("lora_A", "lora_B")
        for p in m.params
    }


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, under their full state-dict keys."""
    return {
        f"{name}.{kind}.{p}": getattr(m, kind)[p].detach()
        for name, m in lora_modules(model)
        for kind in ("lora_A", "lora_B")
        for p in m.params
    }


def count_trainable(model: nn.Module) -> int:
    """Number of parameter elements with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain open_clip state dict (original keys only) with the adapters folded into
    the attention weights; the model itself is not changed."""
    state = {k: v for k, v in model.state_dict().items() if not is_lora_key(k)}
    for name, module in lora_modules(model):
        for key, weight in module.merged_weights().items():
            state[f"{name}.{key}"] = weight
    return state


def load_base_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load an open_clip checkpoint (no LoRA keys) into a patched model.

    ``model.load_state_dict(sd, strict=True)`` would report the adapters as missing.
    Here the whole state dict is checked first (keys: only the adapters may be missing;
    shapes; floating-point tensors where the model has them; finite values); only then
    is anything copied, so a ValueError leaves the model exactly as it was.  The
    adapters keep their values.
    """
    if any(m.merged for _, m in lora_modules(model)):
        raise ValueError("model is merged: call clip_lora.unmerge(model) before loading base weights")
    own = {k: v for k, v in model.state_dict().items() if not is_lora_key(k)}
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match the model: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    for key, target in own.items():
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state dict entry {key} is a {type(value).__name__}, not a tensor")
        if value.shape != target.shape:
            raise ValueError(f"state dict entry {key} is {tuple(value.shape)}, the model expects {tuple(target.shape)}")
        if target.is_floating_point() != value.is_floating_point():
            raise ValueError(f"state dict entry {key} has dtype {value.dtype}, the model expects {target.dtype}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"state dict entry {key} holds non-finite values (NaN or inf)")
    model.load_state_dict(state_dict, strict=False)
