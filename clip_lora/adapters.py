"""Adapter files: our safetensors format, and import of the official CLIP-LoRA ``.pt`` files.

Our format is one safetensors file: the LoRA tensors under their state-dict keys
(``visual.transformer.resblocks.0.attn.lora_A.q`` ...) and, in the safetensors header
metadata under ``"clip_lora"``, a JSON document::

    {"format_version": 1, "config": LoRAConfig.to_dict(), "model_name": "ViT-B-16" | null,
     "towers": {"text": {"depth": 12, "width": 512}, "vision": {"depth": 12, "width": 768}},
     "activation": "quickgelu" | "gelu" | null}

One file keeps the write atomic: it is written to a temporary file in the same
directory and moved into place with ``os.replace``.

The official code (github.com/MaxZanella/CLIP-LoRA, ``loralib/utils.py``) saves
``{'weights': {'layer_<i>': {'q_proj'|'k_proj'|'v_proj'|'proj': {'w_lora_A' [r, d],
'w_lora_B' [d, r]}}}, 'metadata': {r, alpha, encoder, params, position}}``.  Our reading
of its ``apply_lora``/``save_lora``: ``i`` counts the wrapped attention layers in the
order they were wrapped: the text tower's blocks first (if encoder is "text" or "both"),
then the vision tower's, each in increasing block index and only the blocks its position
table selects.  Those tables are ours for 12-block towers ("top" is its name for top1 in
the ViT-B/16 vision table).  Its 24-block ViT-L/14 vision table changed in official commit
e6bf706: HEAD has only all 0-23, half-up 12-23 and half-bottom 0-11; before it, the
12-block indices were reused (bottom 0-3, mid 4-7, up 8-11, half-up 6-11, half-bottom
0-5) and "all" was blocks 0-20.  The files carry no version, so the layer count tells the
two apart (see :func:`load_official_adapter`).  Its scale is alpha/sqrt(r).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from .attention import LoRAAttention
from .config import LoRAConfig, position_blocks
from .model import MODEL_NAME_ATTR, mlp_activation
from .patch import CONFIG_ATTR, lora_modules, lora_state_dict, patch_fused, patch_reference
from .towers import tower_blocks, tower_shapes

FORMAT_VERSION = 1
METADATA_KEY = "clip_lora"
OFFICIAL_SUFFIXES = (".pt", ".pth")
OFFICIAL_PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "proj"}


# =============================================================================
# Checks shared by both formats
# =============================================================================


def _config_differences(file_cfg: LoRAConfig, model_cfg: LoRAConfig) -> list[str]:
    # Dropout only matters while training, so an adapter loads whatever dropout it was trained with.
    names = ("r", "alpha", "scaling", "encoder", "params", "position")
    return [
        f"{n}: file has {getattr(file_cfg, n)!r}, model has {getattr(model_cfg, n)!r}"
        for n in names
        if getattr(file_cfg, n) != getattr(model_cfg, n)
    ]


def _prepare_model(model: nn.Module, file_cfg: LoRAConfig, path: Path, fused: bool) -> None:
    """Patch an unpatched model with the file's config, or check a patched one against it."""
    model_cfg = getattr(model, CONFIG_ATTR, None)
    if model_cfg is None:
        (patch_fused if fused else patch_reference)(model, file_cfg)
        return
    diffs = _config_differences(file_cfg, model_cfg)
    if diffs:
        raise ValueError(f"adapter {path} does not match the model's LoRA config: {'; '.join(diffs)}")
    if any(m.merged for _, m in lora_modules(model)):
        raise ValueError("model is merged: call clip_lora.unmerge(model) before loading an adapter")


# =============================================================================
# Our format
# =============================================================================


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapters of a patched ``model`` and its config to ``path`` (safetensors),
    atomically: a crash mid-write leaves any previous file at ``path`` intact."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError("model is not patched: there is no adapter to save (call clip_lora.patch_fused first)")
    path = Path(path)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in lora_state_dict(model).items()}
    info = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "model_name": getattr(model, MODEL_NAME_ATTR, None),
        "towers": tower_shapes(model),
        "activation": mlp_activation(model),  # an adapter fits the activation it was trained under
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(info)})
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the JSON info of one of our adapter files."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if METADATA_KEY not in meta:
            raise ValueError(f"{path} is not a clip_lora adapter file (no {METADATA_KEY!r} metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta[METADATA_KEY])
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: adapter format version {info.get('format_version')} is not {FORMAT_VERSION}")
    return tensors, info


def load_adapter(model: nn.Module, path: str | os.PathLike, *, fused: bool = True) -> nn.Module:
    """Load adapter weights into ``model`` (in place) and return it.

    ``path`` is one of our safetensors files, or an official CLIP-LoRA ``.pt``/``.pth``
    file (see :func:`load_official_adapter`).  An unpatched model is first patched with
    the file's config (fused kernels unless ``fused=False``); a patched one must match
    the file's config, model name and tower shapes, or a ValueError names the difference.
    """
    path = Path(path)
    if path.suffix in OFFICIAL_SUFFIXES:
        return load_official_adapter(model, path, fused=fused)
    tensors, info = read_adapter(path)
    file_name, model_name = info.get("model_name"), getattr(model, MODEL_NAME_ATTR, None)
    if file_name and model_name and file_name != model_name:
        raise ValueError(f"adapter {path} was saved for model {file_name!r}, this model is {model_name!r}")
    file_act, model_act = info.get("activation"), mlp_activation(model)
    if file_act and model_act and file_act != model_act:
        raise ValueError(
            f"adapter {path} was trained with {file_act} MLPs, this model has {model_act}: build the model with "
            f"activation={file_act!r} (CLI: --activation {file_act})"
        )
    shapes = tower_shapes(model)
    for tower, saved in info["towers"].items():
        if shapes.get(tower) != saved:
            raise ValueError(f"adapter {path}: {tower} tower is {saved} in the file, {shapes.get(tower)} in the model")
    _prepare_model(model, LoRAConfig.from_dict(info["config"]), path, fused)
    own = lora_state_dict(model)
    if set(own) != set(tensors):
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        raise ValueError(f"adapter {path} keys differ from the model's: missing {missing[:4]}, unexpected {extra[:4]}")
    with torch.no_grad():
        for key, target in own.items():
            if target.shape != tensors[key].shape:
                got, want = tuple(tensors[key].shape), tuple(target.shape)
                raise ValueError(f"adapter {path}: {key} is {got} in the file, {want} in the model")
            target.copy_(tensors[key])
    return model


# =============================================================================
# The official CLIP-LoRA .pt format
# =============================================================================


# The official ViT-L/14 vision table (INDEX_POSITIONS_VISION['ViT-L/14']) in each version
# of the official code; a position missing from a version raised KeyError there, so no
# file of that version has it.
OFFICIAL_L14_VISION = {
    "HEAD": {"all": list(range(24)), "half-up": list(range(12, 24)), "half-bottom": list(range(12))},
    "pre-e6bf706": {
        "bottom": [0, 1, 2, 3],
        "mid": [4, 5, 6, 7],
        "up": [8, 9, 10, 11],
        "half-up": list(range(6, 12)),
        "half-bottom": list(range(6)),
        "all": list(range(21)),
    },
}


def official_blocks(position: str, depth: int, version: str = "HEAD", tower: str = "vision") -> list[int] | None:
    """Blocks the official code (``version``: "HEAD" or "pre-e6bf706") adapts for
    ``position`` in a ``depth``-block ``tower``; None where that version has no such entry."""
    position = "top1" if position == "top" else position
    if tower == "vision" and depth == 24:  # ViT-L/14's vision tower: the only table that changed
        return OFFICIAL_L14_VISION[version].get(position)
    return position_blocks(position, depth)


def _official_layout(
    model: nn.Module, cfg: LoRAConfig, position: str, n_layers: int, path: Path
) -> dict[str, list[int]]:
    """``{tower: blocks}`` as the official code that wrote this ``n_layers`` file adapted them.

    Where the versions' tables differ (ViT-L/14 vision), the version whose layer count
    matches the file is used; no match, or two versions that match with different blocks,
    is a ValueError that says so rather than a guess.
    """
    depths = {t: len(tower_blocks(model, t)) for t in cfg.towers}
    candidates: dict[str, dict[str, list[int]]] = {}
    for version in OFFICIAL_L14_VISION:
        blocks = {t: official_blocks(position, d, version, t) for t, d in depths.items()}
        if all(b is not None for b in blocks.values()):
            candidates[version] = blocks
    shape = ", ".join(f"{t} {d} blocks" for t, d in depths.items())
    where = f"encoder={cfg.encoder!r}, position={position!r} on this model ({shape})"
    if not candidates:
        raise ValueError(
            f"{path}: the official code has no {position!r} entry for a 24-block (ViT-L/14) vision tower in any "
            f"version (HEAD: {', '.join(OFFICIAL_L14_VISION['HEAD'])}; before e6bf706: "
            f"{', '.join(OFFICIAL_L14_VISION['pre-e6bf706'])}), so it cannot have written {where}"
        )
    counts = {v: sum(len(b) for b in blocks.values()) for v, blocks in candidates.items()}
    matching = {v: candidates[v] for v, n in counts.items() if n == n_layers}
    if not matching:
        if len(set(counts.values())) == 1:
            gives = str(counts.popitem()[1])
        else:
            label = {"HEAD": "official HEAD", "pre-e6bf706": "official code before e6bf706"}
            gives = " or ".join(f"{n} ({label[v]})" for v, n in counts.items())
        raise ValueError(
            f"{path} has {n_layers} layers; {where} gives {gives} (text blocks first, then vision): "
            "was it saved for another backbone?"
        )
    layouts = {tuple((t, tuple(b)) for t, b in blocks.items()) for blocks in matching.values()}
    if len(layouts) > 1:
        raise ValueError(
            f"{path}: {n_layers} layers fit both the official HEAD table and the one before e6bf706 for {where}, "
            "with different blocks; the file does not say which version wrote it, so it cannot be placed"
        )
    return next(iter(matching.values()))


def _official_config(meta: dict[str, Any]) -> LoRAConfig:
    params = meta["params"]
    params = tuple(params) if not isinstance(params, str) else tuple(params.replace(",", ""))
    position = "top1" if meta["position"] == "top" else meta["position"]
    return LoRAConfig(
        r=int(meta["r"]),
        alpha=float(meta["alpha"]),
        encoder=meta["encoder"],
        params=params,
        position=position,
        scaling="alpha/sqrt(r)",
    )


def _official_patch_config(model: nn.Module, cfg: LoRAConfig, official: dict[str, list[int]]) -> LoRAConfig:
    """The config to patch an unpatched model with so that exactly the ``official`` blocks
    get adapters.  Where they differ from our table (ViT-L/14 files from before e6bf706:
    "up" is blocks 8-11 there, 16-23 here) and every adapted tower uses the same official
    indices, patch with that explicit index list; otherwise keep ``cfg``."""
    try:
        ours = {t: cfg.blocks(len(tower_blocks(model, t))) for t in cfg.towers}
    except ValueError:
        ours = {}
    lists = {tuple(v) for v in official.values()}
    if ours != official and len(lists) == 1:
        return dataclasses.replace(cfg, position=lists.pop())
    return cfg


def load_official_adapter(model: nn.Module, path: str | os.PathLike, *, fused: bool = True) -> nn.Module:
    """Import an adapter saved by the official CLIP-LoRA code (layout in the module docstring).

    Each ``layer_<i>`` goes to the i-th (tower, block) of the official enumeration.  For
    a ViT-L/14 vision tower the file's layer count picks the official version's table:
    HEAD (all 0-23, half-up 12-23, half-bottom 0-11) or the one before e6bf706 (bottom,
    mid, up = 0-3, 4-7, 8-11; half-up 6-11; half-bottom 0-5; all 0-20); a count that fits
    neither, or a position neither defines, is a ValueError that says why.  An unpatched
    model is patched on exactly the official blocks (an explicit index list where the
    official table differs from ours, e.g. the older "up" = 8-11).  Where our config adapts
    more blocks than the official code did (the older "all", 0-20), the extra adapters get
    B = 0, so the model computes exactly what the official one did; a warning says so.
    """
    path = Path(path)
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or "weights" not in data or "metadata" not in data:
        raise ValueError(f"{path} is not an official CLIP-LoRA adapter (expected 'weights' and 'metadata')")
    meta, weights = data["metadata"], data["weights"]
    file_cfg = _official_config(meta)
    official = _official_layout(model, file_cfg, meta["position"], len(weights), path)
    if getattr(model, CONFIG_ATTR, None) is None:
        file_cfg = _official_patch_config(model, file_cfg, official)
    _prepare_model(model, file_cfg, path, fused)
    order: list[tuple[str, int, LoRAAttention]] = []
    for tower in file_cfg.towers:
        blocks = tower_blocks(model, tower)
        for i in official[tower]:
            attn = blocks[i].attn
            if not isinstance(attn, LoRAAttention):
                raise ValueError(
                    f"{path}: the official code adapts {tower} block {i} for position {meta['position']!r}, "
                    "which this model's config does not adapt"
                )
            order.append((tower, i, attn))
    loaded: set[int] = set()
    with torch.no_grad():
        for idx, (tower, block, attn) in enumerate(order):
            layer = weights[f"layer_{idx}"]
            for p in file_cfg.params:
                entry = layer[OFFICIAL_PROJ[p]]
                for kind, ours in (("w_lora_A", attn.lora_A[p]), ("w_lora_B", attn.lora_B[p])):
                    if tuple(entry[kind].shape) != tuple(ours.shape):
                        raise ValueError(
                            f"{path}: layer_{idx} ({tower} block {block}) {OFFICIAL_PROJ[p]}.{kind} is "
                            f"{tuple(entry[kind].shape)}, the model expects {tuple(ours.shape)}"
                        )
                    ours.copy_(entry[kind])
            loaded.add(id(attn))
        extra = [(name, m) for name, m in lora_modules(model) if id(m) not in loaded]
        for _, m in extra:
            for b in m.lora_B.values():
                b.zero_()
    if extra:
        warnings.warn(
            f"{path}: the official code did not adapt {len(extra)} of this model's patched attentions "
            f"(e.g. {extra[0][0]}); their B is set to 0 so the model matches the official one",
            stacklevel=2,
        )
    return model
