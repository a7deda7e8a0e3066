"""Build an open_clip model with LoRA already patched in, with the MLP activation its
weights were trained with.

OpenAI's CLIP was trained with QuickGELU (``x * sigmoid(1.702 x)``), while open_clip's
plain configs (``ViT-B-16`` ...) use ``nn.GELU``; open_clip only logs a warning when the
two meet.  :func:`create_model` therefore works out which activation the weights need
(:func:`resolve_weights`) and builds that, refusing a combination known to be wrong.

Weights are recognised as trained with QuickGELU when they are:

- an open_clip tag whose pretrained config says ``quick_gelu`` (``openai`` for every
  OpenAI model; also e.g. ``dfn2b``/``metaclip_*`` on the ``-quickgelu`` names); any
  other tag is GELU, as open_clip itself assumes;
- a local TorchScript archive: OpenAI publishes CLIP only in that form (the
  ``ViT-B-16.pt`` files that ``clip.load`` caches and the official CLIP-LoRA code loads),
  and open_clip and LAION never write one;
- a local state dict with the ``input_resolution``/``context_length``/``vocab_size``
  entries that only OpenAI's TorchScript model carries (``torch.save(jit_model.state_dict())``);
- a file inside the Hugging Face cache folder of a known tag's repository (e.g.
  ``models--timm--vit_base_patch16_clip_224.openai``): that tag's activation.

Any other local file (an open_clip ``.bin``/``.safetensors``, LAION's included: its key
layout is the same as OpenAI's) is not guessed at: it gets the model config's activation,
so name the ``-quickgelu`` config or pass ``activation="quickgelu"`` for such a copy of
OpenAI's weights.
"""

from __future__ import annotations

import difflib
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .config import LoRAConfig
from .errors import PretrainedError, reason
from .patch import patch_fused, patch_reference
from .towers import find_towers

MODEL_NAME_ATTR = "clip_lora_model_name"
PAPER_LORA = LoRAConfig()  # the paper's fixed recipe (frozen dataclass: a safe default)
ACTIVATIONS = ("auto", "quickgelu", "gelu")
# Entries of OpenAI's TorchScript CLIP state dict that are not weights (OpenAI's own
# build_model drops them too); open_clip's models have no such keys.
OPENAI_JIT_KEYS = ("input_resolution", "context_length", "vocab_size")
_SPECS = ("hf-hub:", "local-dir:")


def _check_model_name(name: str) -> str:
    """open_clip's spelling of ``name`` ("ViT-B/16" -> "ViT-B-16"), or an error that lists
    close and common names.  Hub and local-directory specs pass through."""
    import open_clip

    if name.startswith(_SPECS):
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


# =============================================================================
# Which weights, trained with which activation
# =============================================================================


@dataclass(frozen=True)
class Weights:
    """Where a model's weights come from and the MLP activation they were trained with.

    ``kind``: "random" (no weights), "tag" (an open_clip tag, downloaded or cached at
    ``path``), "openai-file" (a local file recognised as OpenAI's), "file" (any other
    local checkpoint) or "spec" (an hf-hub:/local-dir: model brings its own).
    ``activation``: "quickgelu"/"gelu" when known, None otherwise; ``evidence`` says why.
    """

    pretrained: str | None
    kind: str
    activation: str | None = None
    evidence: str = ""
    path: str | None = None
    torchscript: bool = False


def _hf_cache_dir(cache_dir: str | None) -> str:
    if cache_dir:
        return cache_dir
    try:
        from huggingface_hub import constants

        return constants.HF_HUB_CACHE
    except ImportError:
        return "~/.cache/huggingface/hub"


def _is_torchscript(path: str) -> bool:
    # torch.jit.save writes code/ and constants.pkl into its zip; torch.save never does.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _checkpoint_keys(path: str) -> set[str]:
    """Top-level keys of a checkpoint's state dict, without reading its tensors."""
    if path.endswith(".safetensors"):
        import safetensors

        with safetensors.safe_open(path, framework="pt") as f:
            return set(f.keys())
    if path.endswith((".npz", ".npy")):  # big_vision weights (open_clip converts them): not OpenAI's
        return set()
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PretrainedError(
            f"--pretrained {path} cannot be read as a checkpoint ({reason(e)}): it is truncated, corrupt or not a "
            "torch/safetensors file; give an OpenAI or open_clip checkpoint, or --pretrained none"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    return set(data) if isinstance(data, dict) else set()


def _local_file_weights(name: str, path: str) -> Weights:
    if _is_torchscript(path):
        evidence = f"{path} is a TorchScript archive, the form OpenAI publishes CLIP in"
        return Weights(path, "openai-file", "quickgelu", evidence, path, torchscript=True)
    keys = _checkpoint_keys(path)
    if set(OPENAI_JIT_KEYS) <= keys:
        evidence = f"{path} holds {'/'.join(OPENAI_JIT_KEYS)}, which only OpenAI's CLIP state dict carries"
        return Weights(path, "openai-file", "quickgelu", evidence, path)
    parts = set(Path(path).resolve().parts) | set(Path(path).parts)
    for tag, cfg in _tag_configs(name).items():
        repo = os.path.split(cfg.get("hf_hub", ""))[0]  # "org/name/" or "org/name/file": open_clip's split
        if repo and "models--" + repo.replace("/", "--") in parts:
            act = "quickgelu" if cfg.get("quick_gelu", False) else "gelu"
            evidence = f"{path} is in the Hugging Face cache of open_clip's {tag!r} weights"
            return Weights(path, "file", act, evidence, path)
    return Weights(path, "file", None, f"{path}: origin not recognised", path)


def _tag_configs(name: str) -> dict[str, dict[str, Any]]:
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    return {tag: get_pretrained_cfg(name, tag) for tag in list_pretrained_tags_by_model(name)}


def resolve_weights(name: str, pretrained: str | None, *, cache_dir: str | None = None) -> Weights:
    """Locate ``pretrained`` for model ``name`` and the activation it was trained with.

    A tag is downloaded (or found in the cache) here, so missing weights fail at once with
    a FileNotFoundError that says how to point ``pretrained`` at a local file; nothing
    ever falls back to a random init.  An unknown tag or a missing path is a ValueError
    listing the tags.  See the module docstring for how a local file is recognised.
    """
    name = _check_model_name(name)
    if name.startswith(_SPECS):
        return Weights(pretrained, "spec", None, f"{name} brings its own weights and config")
    if pretrained is None:
        return Weights(None, "random", None, "random init")
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg, list_pretrained_tags_by_model

    cfg = get_pretrained_cfg(name, pretrained)
    if cfg:
        act = "quickgelu" if cfg.get("quick_gelu", False) else "gelu"
        evidence = f"open_clip's {pretrained!r} weights for {name} were trained with {act}"
        try:
            path = download_pretrained(cfg, cache_dir=cache_dir)
        except Exception as e:
            url = cfg.get("url", "")
            file = f"/path/to/{os.path.basename(url)} (OpenAI's file: {url}; clip.load keeps it in ~/.cache/clip)"
            raise FileNotFoundError(
                f"the {pretrained!r} weights for {name} are not in the cache ({_hf_cache_dir(cache_dir)}) and could "
                f"not be downloaded ({type(e).__name__}); point --pretrained at a local copy: "
                f"--pretrained {file if url else '/path/to/checkpoint'}, or use --pretrained none for a random init"
            ) from e
        if not path:
            raise FileNotFoundError(f"open_clip has no download location for the {pretrained!r} weights of {name}")
        return Weights(pretrained, "tag", act, evidence, str(path))
    if os.path.isfile(pretrained):
        return _local_file_weights(name, pretrained)
    tags = list_pretrained_tags_by_model(name)
    raise ValueError(
        f"pretrained={pretrained!r} is neither a file nor an open_clip tag for {name} "
        f"(tags: {', '.join(tags) or 'none'}); give a local checkpoint path, a tag, or none for a random init"
    )


def _config_quick_gelu(name: str) -> bool | None:
    import open_clip

    if name.startswith(_SPECS):
        return None
    return bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))


def choose_activation(
    name: str, weights: Weights, activation: str = "auto", allow_activation_mismatch: bool = False
) -> str | None:
    """The MLP activation to build: the one asked for (``activation``, or a ``-quickgelu``
    config by its name), else the one the weights were trained with, else the config's.

    Asking for an activation the weights were not trained with (``activation="gelu"``
    with OpenAI's weights, a ``-quickgelu`` config with LAION's) is a ValueError unless
    ``allow_activation_mismatch``.  None: the hf-hub/local-dir config decides.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    config_quick = _config_quick_gelu(name)
    requested = activation if activation != "auto" else ("quickgelu" if config_quick else None)
    trained = weights.activation
    if requested and trained and requested != trained and not allow_activation_mismatch:
        why = f"activation={activation!r}" if activation != "auto" else f"the {name} config uses {requested}"
        raise ValueError(
            f"{weights.evidence}, but {why}: every MLP would run the wrong activation. Use activation 'auto' "
            f"(CLI: --activation auto){' and the plain config' if activation == 'auto' else ''}, or "
            "allow_activation_mismatch=True (CLI: --allow-activation-mismatch) if the mismatch is intended"
        )
    if requested or trained:
        return requested or trained
    return None if config_quick is None else ("quickgelu" if config_quick else "gelu")


def mlp_activation(model: nn.Module) -> str | None:
    """The MLP activation of the model's open_clip transformer blocks: "quickgelu",
    "gelu", another class name, several joined by "+", or None without such blocks."""
    from open_clip.transformer import QuickGELU

    kinds = set()
    for tower in find_towers(model).values():
        for block in getattr(tower, "resblocks", ()):
            act = getattr(getattr(block, "mlp", None), "gelu", None)
            if isinstance(act, QuickGELU):
                kinds.add("quickgelu")
            elif isinstance(act, nn.GELU):
                kinds.add("gelu" if act.approximate == "none" else f"gelu-{act.approximate}")
            elif act is not None:
                kinds.add(type(act).__name__.lower())
    return "+".join(sorted(kinds)) or None


def _load_openai_file(model: nn.Module, weights: Weights) -> None:
    """Load a recognised OpenAI file, which open_clip's loader refuses (TorchScript needs
    weights_only=False there; the extra JIT entries fail its strict load).  OpenAI's key
    layout is open_clip's ``CLIP`` layout, so the rest is open_clip's own conversion."""
    from open_clip.factory import load_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    path = weights.path
    if weights.torchscript:
        # TorchScript code is not pickled Python: loading it to read the weights runs nothing.
        state = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        state = load_state_dict(path)
    # A TorchScript state dict also lists non-persistent buffers (open_clip's attn_mask).
    transient = {n for n, _ in model.named_buffers()} - set(model.state_dict())
    state = {k: v for k, v in state.items() if k not in OPENAI_JIT_KEYS and k not in transient}
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"pretrained={path!r} does not fit {getattr(model, MODEL_NAME_ATTR, 'this model')}: missing "
            f"{result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]} (was it saved for another backbone?)"
        )


# =============================================================================
# create_model
# =============================================================================


def create_model(
    name: str = "ViT-B-16",
    pretrained: str | None = "openai",
    lora: LoRAConfig | None = PAPER_LORA,
    fused: bool = True,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    activation: str = "auto",
    allow_activation_mismatch: bool = False,
    **open_clip_kwargs: Any,
) -> tuple[nn.Module, Callable, Callable, Callable]:
    """Create an open_clip model, patch LoRA into it, and return its transforms and tokenizer.

    Args:
        name: open_clip model name ("ViT-B-16", "ViT-B-32", "ViT-L-14"; the OpenAI
            spelling "ViT-B/16" is accepted), or an "hf-hub:"/"local-dir:" spec.
        pretrained: weights: an open_clip tag (default "openai", the paper's), a local
            checkpoint path, or None for a random init of the real architecture (no
            download).  Weights that are neither cached nor downloadable raise a
            FileNotFoundError at once; there is no fallback to random weights.
        lora: where to put adapters (default: the paper's recipe); None returns the
            unpatched model.
        fused: the fused Triton kernels (True) or the plain PyTorch reference provider.
        device: where to build the model (default CPU).
        precision: open_clip's ``precision`` ("fp32", "fp16", "bf16", "pure_fp16", ...).
            LoRA training keeps fp32 weights and runs under autocast; the adapters are
            fp32 in every case.
        activation: the MLP activation: "auto" (what the weights were trained with:
            QuickGELU for OpenAI's, see the module docstring; else the config's),
            "quickgelu" or "gelu".
        allow_activation_mismatch: build an ``activation`` the weights were not trained
            with (otherwise a ValueError).
        **open_clip_kwargs: passed on to ``open_clip.create_model_and_transforms``
            (e.g. ``aug_cfg``, ``cache_dir``).

    Returns:
        ``(model, preprocess_train, preprocess_val, tokenizer)``: the patched model (its
        name recorded as ``model.clip_lora_model_name``; :func:`mlp_activation` reads its
        activation), open_clip's train and eval image transforms (open_clip's own train
        augmentation, not the paper's RandomResizedCrop + flip recipe), and the model's
        tokenizer (bundled, works offline).
    """
    import open_clip

    name = _check_model_name(name)
    if open_clip_kwargs.pop("force_quick_gelu", False):
        if activation == "gelu":
            raise ValueError("force_quick_gelu=True contradicts activation='gelu'")
        activation = "quickgelu"
    weights = resolve_weights(name, pretrained, cache_dir=open_clip_kwargs.get("cache_dir"))
    chosen = choose_activation(name, weights, activation, allow_activation_mismatch)
    if chosen == "quickgelu":
        open_clip_kwargs["force_quick_gelu"] = True
    elif chosen == "gelu" and _config_quick_gelu(name) is not False:
        open_clip_kwargs["quick_gelu"] = False  # overrides a -quickgelu config
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name,
        pretrained=None if weights.kind == "openai-file" else pretrained,
        precision=precision,
        device=device or "cpu",
        **open_clip_kwargs,
    )
    setattr(model, MODEL_NAME_ATTR, name)
    if weights.kind == "openai-file":
        _load_openai_file(model, weights)
    built = mlp_activation(model)
    # What the choice decides is QuickGELU or not; a config's own GELU variant (SigLIP's
    # tanh approximation) is not a mismatch.
    if chosen is not None and built is not None and (built == "quickgelu") != (chosen == "quickgelu"):
        raise ValueError(f"{name} was built with {built} MLPs where {chosen} was chosen: its config overrides it")
    tokenizer = open_clip.get_tokenizer(name)
    if lora is not None:
        (patch_fused if fused else patch_reference)(model, lora)
    return model, preprocess_train, preprocess_val, tokenizer
