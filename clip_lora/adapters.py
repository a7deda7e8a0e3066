"""Adapter files: our safetensors format, and import of the official CLIP-LoRA ``.pt`` files.

Our format is one safetensors file: the LoRA tensors under their state-dict keys
(``visual.transformer.resblocks.0.attn.lora_A.q`` ...) and, in the safetensors header
metadata under ``"clip_lora"``, a JSON document::

    {"format_version": 1, "config": LoRAConfig.to_dict(), "model_name": "ViT-B-16" | null,
     "towers": {"text": {"depth": 12, "width": 512}, "vision": {"depth": 12, "width": 768}},
     "signature": {"text": {"width": 512, "layers": 12, "heads": 8, "context_length": 77,
                            "vocab_size": 49408},
                   "vision": {"width": 768, "layers": 12, "heads": 12, "image_size": [224, 224],
                              "patch_size": [16, 16]}},
     "activation": "quickgelu" | "gelu" | null,
     "families": {"text": "open_clip", "vision": "open_clip"}}

``signature`` holds each adapted tower's architecture, so that an adapter saved from
ViT-B-32 is refused by a ViT-B-16 (same tower widths and depths, other patch size) even
when the model was built by open_clip directly and carries no name.  Files written
before the signature existed load with the older check (tower depth and width, plus the
model name where both sides have one).  ``families`` names each adaptable tower's family
(:func:`clip_lora.families.families`); the signature covers open_clip's own transformer
towers only.

One file keeps the write atomic: it is written to a temporary file in the same
directory and moved into place with ``os.replace``.  Loading is atomic too: the whole
file (keys, shapes, dtypes, config, signature, finite values) is checked before the
model is touched, so a failed load leaves the model exactly as it was (same modules,
tensors and ``requires_grad``).  Every failure is an :class:`~clip_lora.errors.AdapterFileError`
(a ValueError) whose one-line message names the file.

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
import pickle
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from .attention import LoRAAttention
from .config import LoRAConfig, position_blocks
from .errors import AdapterFileError, ModelMismatchError, reason
from .families import families
from .model import MODEL_NAME_ATTR, mlp_activation
from .patch import CONFIG_ATTR, LoRAModule, apply_patch, lora_modules, lora_state_dict, plan_patch
from .towers import find_towers, tower_blocks, tower_shapes

FORMAT_VERSION = 1
METADATA_KEY = "clip_lora"
OFFICIAL_SUFFIXES = (".pt", ".pth")
OFFICIAL_PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "proj"}
OFFICIAL_METADATA = ("r", "alpha", "encoder", "params", "position")


# =============================================================================
# Model signature
# =============================================================================


def _pair(value: Any) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        return [int(v) for v in value]
    return [int(value), int(value)]


def model_signature(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Each open_clip transformer tower's architecture: width, layers, heads, and the
    vision tower's image and patch size or the text tower's context length and vocabulary."""
    out: dict[str, dict[str, Any]] = {}
    for name, t in find_towers(model).items():
        if t is None:
            continue
        sig: dict[str, Any] = {
            "width": int(t.width),
            "layers": len(t.resblocks),
            "heads": int(getattr(t.resblocks[0].attn, "num_heads", 0)),
        }
        if name == "vision":
            sig["image_size"] = _pair(getattr(model.visual, "image_size", None))
            sig["patch_size"] = _pair(getattr(model.visual, "patch_size", None))
        else:
            owner = model if getattr(model, "transformer", None) is t else getattr(model, "text", model)
            sig["context_length"] = getattr(owner, "context_length", None)
            sig["vocab_size"] = getattr(owner, "vocab_size", None)
        out[name] = sig
    return out


def _describe(name: str | None, signature: Mapping[str, Mapping[str, Any]]) -> str:
    """A model for an error message: its name (if recorded) and its towers' architecture."""
    parts = []
    for tower, sig in sorted(signature.items()):
        size = "x".join(map(str, sig.get("image_size") or [])) if tower == "vision" else None
        extra = (
            f"image {size}, patch {'x'.join(map(str, sig.get('patch_size') or []))}"
            if tower == "vision"
            else f"context {sig.get('context_length')}, vocab {sig.get('vocab_size')}"
        )
        parts.append(f"{tower} {extra}, width {sig.get('width')}, {sig.get('layers')} layers, {sig.get('heads')} heads")
    return f"{name or 'an unnamed model'} [{'; '.join(parts)}]"


def _check_model(model: nn.Module, info: Mapping[str, Any], path: Path) -> None:
    """Refuse an adapter saved for another model (see the module docstring)."""
    file_name, model_name = info.get("model_name"), getattr(model, MODEL_NAME_ATTR, None)
    if file_name and model_name and file_name != model_name:
        raise ModelMismatchError(
            f"adapter {path} was saved for model {file_name!r}, this model is {model_name!r}; "
            "load it into that model, or pass check_model=False if you know they match"
        )
    saved = info.get("signature")
    if saved is None:  # written before signatures: the older, weaker check
        shapes = tower_shapes(model)
        for tower, want in info.get("towers", {}).items():
            if shapes.get(tower) != want:
                raise ModelMismatchError(
                    f"adapter {path}: {tower} tower is {want} in the file, {shapes.get(tower)} in the model; "
                    "load it into the model it was trained with"
                )
        return
    ours = model_signature(model)
    diffs = [
        f"{tower} {key} is {value} in the file, {ours.get(tower, {}).get(key)} in the model"
        for tower, sig in sorted(saved.items())
        for key, value in sorted(sig.items())
        if ours.get(tower, {}).get(key) != value
    ]
    if diffs:
        mine = {t: ours.get(t, {}) for t in saved}
        raise ModelMismatchError(
            f"adapter {path} was saved for {_describe(file_name, saved)}, this model is "
            f"{_describe(model_name, mine)}: {'; '.join(diffs)}; load it into the model it was trained with, "
            "or pass check_model=False if you know they match"
        )


# =============================================================================
# Checks shared by both formats
# =============================================================================


def _config_differences(file_cfg: LoRAConfig, model_cfg: LoRAConfig) -> list[str]:
    # Dropout only matters while training, so an adapter loads whatever dropout it was trained with.
    names = ("r", "alpha", "scaling", "encoder", "params", "position", "pooling_head")
    return [
        f"{n}: file has {getattr(file_cfg, n)!r}, model has {getattr(model_cfg, n)!r}"
        for n in names
        if getattr(file_cfg, n) != getattr(model_cfg, n)
    ]


def _targets(
    model: nn.Module, file_cfg: LoRAConfig, path: Path, fused: bool
) -> tuple[dict[Any, tuple[str, LoRAModule]], Callable[[], None]]:
    """The modules the file's tensors go to, ``{key: (name, module)}``, and a commit
    function.  The key is ``(tower, block)`` for open_clip attentions (what the official
    import enumerates) and the qualified name for swapped Linears of the other families.
    A patched model must match the file's config; an unpatched one gets new modules that
    are built here but installed only by the commit, after every check has passed."""
    model_cfg = getattr(model, CONFIG_ATTR, None)
    names = {id(m): n for n, m in model.named_modules()}
    blocks = {
        id(block): (tower, i)
        for tower in ("text", "vision")
        if find_towers(model)[tower] is not None
        for i, block in enumerate(tower_blocks(model, tower))
    }
    targets: dict[Any, tuple[str, LoRAModule]] = {}
    if model_cfg is not None:
        diffs = _config_differences(file_cfg, model_cfg)
        if diffs:
            raise AdapterFileError(f"adapter {path} does not match the model's LoRA config: {'; '.join(diffs)}")
        if any(m.merged for _, m in lora_modules(model)):
            raise ValueError("model is merged: call clip_lora.unmerge(model) before loading an adapter")
        for name, m in lora_modules(model):
            parent = model.get_submodule(name.rpartition(".")[0])
            key = blocks.get(id(parent), name) if isinstance(m, LoRAAttention) else name
            targets[key] = (name, m)
        return targets, lambda: None
    provider = "fused" if fused else "plain"
    try:
        planned = plan_patch(model, file_cfg, provider)
    except ValueError as e:
        raise AdapterFileError(f"adapter {path}: its config does not fit this model: {reason(e)}") from None
    for parent, attr, new in planned.swaps:
        name = f"{names[id(parent)]}.{attr}" if names[id(parent)] else attr
        key = blocks.get(id(parent), name) if isinstance(new, LoRAAttention) else name
        targets[key] = (name, new)
    return targets, lambda: apply_patch(model, planned, file_cfg, provider)


def _check_tensor(path: Path, key: str, value: Any, want: torch.Tensor) -> None:
    if not isinstance(value, torch.Tensor):
        raise AdapterFileError(f"adapter {path}: {key} is a {type(value).__name__}, not a tensor; the file is corrupt")
    if tuple(value.shape) != tuple(want.shape):
        raise AdapterFileError(
            f"adapter {path}: {key} is {tuple(value.shape)} in the file, {tuple(want.shape)} in the model; "
            "was it saved for another model?"
        )
    if not value.is_floating_point():
        raise AdapterFileError(f"adapter {path}: {key} has dtype {value.dtype}, expected a floating-point tensor")
    if not bool(torch.isfinite(value).all()):
        raise AdapterFileError(
            f"adapter {path}: {key} holds non-finite values (NaN or inf): the training that wrote it diverged; "
            "retrain with a lower --lr or --precision bf16"
        )


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise AdapterFileError(f"adapter {path} not found: pass the path of an adapter file")
    if path.is_dir():
        raise AdapterFileError(
            f"adapter {path} is a directory: pass the adapter file inside it (e.g. {path / 'adapter.safetensors'})"
        )
    if path.stat().st_size == 0:
        raise AdapterFileError(f"adapter {path} is empty (0 bytes): the write was interrupted; retrain or re-copy it")


# =============================================================================
# Our format
# =============================================================================


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapters of a patched ``model`` and its config to ``path`` (safetensors),
    atomically: a crash mid-write leaves any previous file at ``path`` intact.  The file
    gets the process umask's mode, like any other file the run writes."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError("model is not patched: there is no adapter to save (call clip_lora.patch_fused first)")
    path = Path(path)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in lora_state_dict(model).items()}
    bad = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"not saving {path}: the adapters hold non-finite values (e.g. {bad[0]}); training diverged")
    signature = model_signature(model)
    info = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "model_name": getattr(model, MODEL_NAME_ATTR, None),
        "towers": tower_shapes(model),
        "signature": {t: signature[t] for t in config.towers if t in signature},
        "activation": mlp_activation(model),  # an adapter fits the activation it was trained under
        "families": families(model),
    }
    # Created by hand rather than with mkstemp, whose 0600 mode would survive the rename;
    # safetensors recreates the file, so its umask-derived mode is put back after writing.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        mode = os.stat(tmp).st_mode & 0o777
        safetensors.torch.save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(info)})
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the JSON info of one of our adapter files (not yet checked against
    any model); an unreadable or malformed file raises :class:`AdapterFileError`."""
    path = Path(path)
    _check_readable(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type, or OSError/ValueError
        raise AdapterFileError(
            f"adapter {path} is not a readable safetensors file ({reason(e)}): it is truncated or corrupt, or not "
            "an adapter; use a file written by `clip-lora train` / clip_lora.save_adapter, or an official .pt"
        ) from None
    if METADATA_KEY not in meta:
        raise AdapterFileError(
            f"adapter {path} is not a clip_lora adapter file (no {METADATA_KEY!r} metadata); "
            "use a file written by clip_lora.save_adapter"
        )
    try:
        info = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise AdapterFileError(
            f"adapter {path}: its {METADATA_KEY!r} metadata is not valid JSON ({e}); the file is corrupt"
        ) from None
    if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION:
        version = info.get("format_version") if isinstance(info, dict) else None
        raise AdapterFileError(
            f"adapter {path}: format version {version!r} is not {FORMAT_VERSION}; "
            "it was written by another clip_lora version, or the metadata is corrupt"
        )
    for key, kind in (("config", dict), ("towers", dict), ("signature", (dict, type(None)))):
        if key not in info and key != "signature":
            raise AdapterFileError(f"adapter {path}: its metadata has no {key!r} entry; the file is corrupt")
        if not isinstance(info.get(key), kind):
            raise AdapterFileError(f"adapter {path}: its metadata {key!r} entry is malformed; the file is corrupt")
    return tensors, info


def _file_config(info: Mapping[str, Any], path: Path) -> LoRAConfig:
    try:
        return LoRAConfig.from_dict(info["config"])
    except (TypeError, ValueError) as e:
        raise AdapterFileError(
            f"adapter {path}: its LoRA config is invalid ({reason(e)}); the file is corrupt"
        ) from None


def load_adapter(
    model: nn.Module, path: str | os.PathLike, *, fused: bool = True, check_model: bool = True
) -> nn.Module:
    """Load adapter weights into ``model`` (in place) and return it.

    ``path`` is one of our safetensors files, or an official CLIP-LoRA ``.pt``/``.pth``
    file (see :func:`load_official_adapter`).  An unpatched model is patched with the
    file's config (fused kernels unless ``fused=False``); a patched one must match the
    file's config.  The file's tower signature must match the model's (an adapter for
    ViT-B-32 is refused by ViT-B-16): ``check_model=False`` skips that check for users
    who know the models are compatible (shapes are still checked).

    Everything is checked before the model is touched: on any error
    (:class:`~clip_lora.errors.AdapterFileError`) the model is exactly as before.
    """
    path = Path(path)
    if path.suffix in OFFICIAL_SUFFIXES:
        return load_official_adapter(model, path, fused=fused)
    tensors, info = read_adapter(path)
    if check_model:
        _check_model(model, info, path)
    file_act, model_act = info.get("activation"), mlp_activation(model)
    if file_act and model_act and file_act != model_act:
        raise ModelMismatchError(
            f"adapter {path} was trained with {file_act} MLPs, this model has {model_act}: build the model with "
            f"activation={file_act!r} (CLI: --activation {file_act})"
        )
    file_cfg = _file_config(info, path)
    targets, commit = _targets(model, file_cfg, path, fused)
    want = {
        f"{name}.{kind}.{p}": getattr(m, kind)[p]
        for name, m in targets.values()
        for kind in ("lora_A", "lora_B")
        for p in m.params
    }
    if set(want) != set(tensors):
        missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
        raise AdapterFileError(
            f"adapter {path} keys differ from the model's: missing {missing[:4]}, unexpected {extra[:4]}; "
            "was it saved for another model?"
        )
    for key, target in want.items():
        _check_tensor(path, key, tensors[key], target)
    with torch.no_grad():
        for key, target in want.items():
            target.copy_(tensors[key])
    commit()
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
    is an AdapterFileError that says so rather than a guess.
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
        raise AdapterFileError(
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
        raise AdapterFileError(
            f"{path} has {n_layers} layers; {where} gives {gives} (text blocks first, then vision): "
            "was it saved for another backbone?"
        )
    layouts = {tuple((t, tuple(b)) for t, b in blocks.items()) for blocks in matching.values()}
    if len(layouts) > 1:
        raise AdapterFileError(
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


def read_official_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(weights, metadata)`` of an official CLIP-LoRA file, loaded with
    ``weights_only=True`` (no code runs) and checked for the expected structure."""
    path = Path(path)
    _check_readable(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as e:
        raise AdapterFileError(
            f"adapter {path} cannot be read as an official CLIP-LoRA .pt file ({reason(e)}): it is truncated, "
            "corrupt, or holds more than plain tensors and numbers"
        ) from None
    ok = isinstance(data, dict) and all(isinstance(data.get(k), dict) for k in ("weights", "metadata"))
    if not ok:
        raise AdapterFileError(
            f"adapter {path} is not an official CLIP-LoRA adapter: expected a dict with 'weights' and 'metadata' dicts"
        )
    missing = [k for k in OFFICIAL_METADATA if k not in data["metadata"]]
    if missing:
        raise AdapterFileError(
            f"adapter {path}: its metadata has no {', '.join(map(repr, missing))} "
            f"(the official code writes {', '.join(OFFICIAL_METADATA)}); add them or re-save the adapter"
        )
    return data["weights"], data["metadata"]


def load_official_adapter(model: nn.Module, path: str | os.PathLike, *, fused: bool = True) -> nn.Module:
    """Import an adapter saved by the official CLIP-LoRA code (layout in the module docstring).

    Each ``layer_<i>`` goes to the i-th (tower, block) of the official enumeration.  For
    a ViT-L/14 vision tower the file's layer count picks the official version's table:
    HEAD (all 0-23, half-up 12-23, half-bottom 0-11) or the one before e6bf706 (bottom,
    mid, up = 0-3, 4-7, 8-11; half-up 6-11; half-bottom 0-5; all 0-20); a count that fits
    neither, or a position neither defines, is an error that says why.  An unpatched
    model is patched on exactly the official blocks (an explicit index list where the
    official table differs from ours, e.g. the older "up" = 8-11).  Where our config adapts
    more blocks than the official code did (the older "all", 0-20), the extra adapters get
    B = 0, so the model computes exactly what the official one did; a warning says so.  As
    with :func:`load_adapter`, the whole file is checked first: a failed import leaves the
    model as it was.
    """
    path = Path(path)
    weights, meta = read_official_adapter(path)
    try:
        file_cfg = _official_config(meta)
        official = _official_layout(model, file_cfg, meta["position"], len(weights), path)
        if getattr(model, CONFIG_ATTR, None) is None:
            file_cfg = _official_patch_config(model, file_cfg, official)
        targets, commit = _targets(model, file_cfg, path, fused)
        order: list[tuple[str, int, LoRAAttention]] = []
        for tower in file_cfg.towers:
            for i in official[tower]:
                if (tower, i) not in targets:
                    raise AdapterFileError(
                        f"{path}: the official code adapts {tower} block {i} for position {meta['position']!r}, "
                        "which this model's config does not adapt"
                    )
                order.append((tower, i, targets[(tower, i)][1]))
    except AdapterFileError:
        raise
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"adapter {path}: its metadata {meta} does not fit this model ({reason(e)})") from None
    if len(weights) != len(order):
        raise AdapterFileError(
            f"{path} has {len(weights)} layers; encoder={file_cfg.encoder!r}, position={meta['position']!r} on this "
            f"model gives {len(order)} (text blocks first, then vision): was it saved for another backbone?"
        )
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    for idx, (tower, block, attn) in enumerate(order):
        layer = weights.get(f"layer_{idx}")
        if not isinstance(layer, dict):
            raise AdapterFileError(
                f"adapter {path}: no layer_{idx} ({tower} block {block}) among its weights "
                f"{sorted(weights)[:4]}...; the layers must be numbered layer_0..layer_{len(order) - 1}"
            )
        for p in file_cfg.params:
            entry = layer.get(OFFICIAL_PROJ[p])
            for kind, ours in (("w_lora_A", attn.lora_A[p]), ("w_lora_B", attn.lora_B[p])):
                key = f"layer_{idx}.{OFFICIAL_PROJ[p]}.{kind} ({tower} block {block})"
                if not isinstance(entry, dict) or kind not in entry:
                    raise AdapterFileError(f"adapter {path}: {key} is missing; the file is incomplete")
                _check_tensor(path, key, entry[kind], ours)
                copies.append((ours, entry[kind]))
    loaded = {id(attn) for _, _, attn in order}
    extra = [(name, m) for name, m in targets.values() if id(m) not in loaded]
    with torch.no_grad():
        for ours, value in copies:
            ours.copy_(value)
        for _, m in extra:
            for b in m.lora_B.values():
                b.zero_()
    commit()
    if extra:
        warnings.warn(
            f"{path}: the official code did not adapt {len(extra)} of this model's patched attentions "
            f"(e.g. {extra[0][0]}); their B is set to 0 so the model matches the official one",
            stacklevel=2,
        )
    return model
