"""Every open_clip model configuration is either patched or refused with a clear error.

Models are built on the meta device: the real architecture at full size, no memory, no
init, no download (Hugging Face configs come from ``transformers.AutoConfig.for_model``).
The default suite sweeps one configuration per tower family; ``-m slow`` sweeps all of
``open_clip.list_models()`` and checks the counts quoted in the README.
"""

import collections
import logging

import open_clip
import pytest
import torch
from clip_models import offline_builders

from clip_lora import LoRAConfig, count_trainable, patch_fused
from clip_lora.families import families

# One configuration of each (vision family, text family) pair open_clip ships.
REPRESENTATIVE = [
    "ViT-B-16",  # open_clip / open_clip
    "coca_ViT-B-32",  # CoCa: open_clip towers plus a decoder that is not adapted
    "RN50",  # ModifiedResNet's attention pool / open_clip
    "ViT-B-16-SigLIP2",  # timm Attention + AttentionPoolLatent / open_clip (no causal mask)
    "PE-Core-T-16-384",  # timm AttentionRope
    "EVA02-B-16",  # EvaAttention, separate q/k/v
    "EVA01-g-14",  # EvaAttention, packed qkv with separate q/v biases
    "MobileCLIP2-B",  # timm Attention after a conv stem
    "ViTamin-S",  # timm Attention after MbConv stages
    "swin_base_patch4_window7_224",  # WindowAttention
    "vit_relpos_medium_patch16_cls_224",  # RelPosAttention
    "roberta-ViT-B-32",  # HF RoBERTa text
    "mt5-base-ViT-B-32",  # HF mT5 text
    "nllb-clip-base-siglip",  # HF M2M100 text + SigLIP vision
    "convnext_tiny",  # refused vision, text adapts
    "MobileCLIP2-S0",  # refused FastViT vision, text adapts
]


def outcome(name: str) -> tuple[str, str, str]:
    """``(result, vision family, text family)``: "both" when the default config (both
    towers) patches, "text" when the vision tower is refused with a clear error and
    encoder='text' patches.  Anything else raises."""
    if open_clip.get_model_config(name).get("text_cfg", {}).get("hf_model_name"):
        pytest.importorskip("transformers", reason="HF text towers need the test extra's transformers")
    logging.disable(logging.WARNING)
    try:
        with torch.device("meta"), offline_builders(hf_small=False):
            model = open_clip.create_model(name, pretrained=None, pretrained_hf=False, device="meta")
    finally:
        logging.disable(logging.NOTSET)
    fams = families(model)
    try:
        patch_fused(model, LoRAConfig())
        result = "both"
    except ValueError as error:
        message = str(error)
        assert "cannot be adapted" in message and "encoder='text'" in message, message
        assert type(model.visual.trunk).__module__ in message  # names the module type
        patch_fused(model, LoRAConfig(encoder="text"))
        result = "text"
    assert count_trainable(model) > 0
    refused = f"refused: {type(getattr(model.visual, 'trunk', model.visual)).__name__}"
    return result, fams.get("vision", refused), fams["text"]


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_representative_models(name):
    result, vision, _ = outcome(name)
    refused = name.startswith(("convnext", "MobileCLIP2-S"))
    assert result == ("text" if refused else "both"), vision


@pytest.mark.slow
def test_every_open_clip_model():
    counts = collections.Counter()
    for name in open_clip.list_models():
        result, vision, text = outcome(name)
        counts[(vision, text, result)] += 1
    for key, n in sorted(counts.items()):
        print(key, n)
    both = sum(n for (_, _, r), n in counts.items() if r == "both")
    text_only = sum(n for (_, _, r), n in counts.items() if r == "text")
    assert both + text_only == len(open_clip.list_models())
    assert (both, text_only) == (127, 17)  # README: 127 both towers, 17 text tower only (11 ConvNeXt, 6 FastViT)
