"""Finding the two transformer towers of an open_clip model."""

from __future__ import annotations

import torch.nn as nn


def _transformer_of(module: nn.Module | None) -> nn.Module | None:
    transformer = getattr(module, "transformer", None)
    if transformer is not None and isinstance(getattr(transformer, "resblocks", None), nn.ModuleList):
        return transformer
    return None


def find_towers(model: nn.Module) -> dict[str, nn.Module | None]:
    """``{"text": Transformer | None, "vision": Transformer | None}``.

    ``CLIP`` keeps the text transformer at ``model.transformer``; ``CustomTextCLIP`` and
    CoCa at ``model.text.transformer``; the vision tower is ``model.visual.transformer``.
    None marks a tower that is not an open_clip transformer (timm or Hugging Face towers,
    ModifiedResNet).
    """
    # CLIP puts the text transformer on the model itself; the others nest it in model.text.
    text = _transformer_of(model)
    if text is None:
        text = _transformer_of(getattr(model, "text", None))
    return {"text": text, "vision": _transformer_of(getattr(model, "visual", None))}


def tower_blocks(model: nn.Module, tower: str) -> nn.ModuleList:
    """The residual blocks of ``tower`` ("text" or "vision"), or a clear error."""
    transformer = find_towers(model)[tower]
    if transformer is None:
        part = "model.visual" if tower == "vision" else "the text tower"
        kind = type(getattr(model, "visual" if tower == "vision" else "text", model)).__name__
        raise ValueError(
            f"{part} ({kind}) is not an open_clip transformer with resblocks, so it has no attention to "
            f"adapt; choose encoder={'text' if tower == 'vision' else 'vision'!r} or a ViT CLIP model"
        )
    return transformer.resblocks


def tower_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Depth and width of each open_clip transformer tower (for adapter-file checks)."""
    return {
        name: {"depth": len(t.resblocks), "width": int(t.width)}
        for name, t in find_towers(model).items()
        if t is not None
    }
