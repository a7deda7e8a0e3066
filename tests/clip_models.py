"""Small real open_clip models and inputs shared by the tests/test_clip_*.py files."""

import contextlib

import torch
import torch.nn as nn
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from clip_lora import lora_parameters


def tiny_clip(custom: bool, depth: int = 2, seed: int = 0) -> nn.Module:
    """A small real open_clip CLIP in eval mode.  ``custom`` builds open_clip's own
    ``Attention`` (with qk-norm, per-head scale and inner norm, all randomised so they
    matter); otherwise ``nn.MultiheadAttention`` blocks."""
    torch.manual_seed(seed)
    extras = {"qk_norm": True, "scale_heads": True, "scale_attn_inner": True} if custom else {}
    vision = CLIPVisionCfg(layers=depth, width=64, head_width=16, patch_size=8, image_size=32, **extras)
    text = CLIPTextCfg(context_length=16, vocab_size=64, width=32, heads=4, layers=depth, **extras)
    model = CLIP(32, vision, text)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # non-trivial biases, norms and head scales
    return model.eval()


def tiny_tokens(n: int = 3, context: int = 16, vocab: int = 64, seed: int = 3) -> torch.Tensor:
    """Token rows shaped like the tokenizer's: ids, then the EOT (the max id), then zeros."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, context, dtype=torch.long)
    for i, length in enumerate(torch.randint(3, context - 4, (n,), generator=g).tolist()):
        tokens[i, :length] = torch.randint(1, vocab - 1, (length,), generator=g)
        tokens[i, length] = vocab - 1
    return tokens


def randomize_adapters(model: nn.Module, seed: int = 2, std: float = 0.05) -> None:
    """Non-identity adapters: B is zero after patching, so fill A and B with noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


# -----------------------------------------------------------------------------
# Every family at reduced size: the real open_clip config, narrower and shallower
# -----------------------------------------------------------------------------

# timm keyword arguments that shrink each trunk family; open_clip has no way to pass
# them, so small_model wraps timm.create_model while open_clip builds the tower.
TIMM_SMALL = {
    "vit": {"depth": 2, "embed_dim": 64, "num_heads": 4, "img_size": 32},
    "eva": {"depth": 2, "embed_dim": 64, "num_heads": 4, "img_size": 32},
    "hybrid": {"depth": 2, "img_size": 32},  # a conv stem fixes the width
    "swin": {"depths": (1, 1), "num_heads": (2, 4), "embed_dim": 32, "img_size": 56, "window_size": 7},
}
SMALL_TEXT = {"width": 64, "heads": 4, "layers": 2}
# Tiny Hugging Face configs of the architecture each HF-text model names (no hub access);
# dropout off so that train-mode passes of two copies are comparable.
HF_SMALL = {
    "roberta": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                "vocab_size": 100, "max_position_embeddings": 40, "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0},
    "xlm-roberta": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                    "vocab_size": 100, "max_position_embeddings": 40, "hidden_dropout_prob": 0.0,
                    "attention_probs_dropout_prob": 0.0},
    "mt5": {"d_model": 32, "d_kv": 8, "num_heads": 4, "num_layers": 2, "d_ff": 64, "vocab_size": 100,
            "dropout_rate": 0.0},
    "m2m_100": {"d_model": 32, "encoder_layers": 2, "decoder_layers": 1, "encoder_attention_heads": 4,
                "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "vocab_size": 100,
                "max_position_embeddings": 40, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
                "layerdrop": 0.0},  # no random layer skipping: fused and plain must see the same graph
}


def hf_model_type(hf_name: str) -> str:
    """The transformers model_type behind an open_clip ``hf_model_name``."""
    for key, kind in (("xlm-roberta", "xlm-roberta"), ("roberta", "roberta"), ("mt5", "mt5"), ("nllb", "m2m_100")):
        if key in hf_name:
            return kind
    raise KeyError(hf_name)


@contextlib.contextmanager
def offline_builders(timm_kwargs: dict | None = None, hf_small: bool = True):
    """While open_clip builds a model: timm trunks get ``timm_kwargs`` (a shrink), and
    Hugging Face configs come from ``transformers.AutoConfig.for_model`` (tiny ones when
    ``hf_small``) instead of the hub."""
    import timm

    patches = []
    if timm_kwargs:
        create = timm.create_model

        def small_create(name, *args, **kwargs):
            return create(name, *args, **{**kwargs, **timm_kwargs})

        patches.append((timm, "create_model", small_create))
    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is not None:
        def for_name(name, *args, **kwargs):
            kind = hf_model_type(name)
            return transformers.AutoConfig.for_model(kind, **(HF_SMALL[kind] if hf_small else {}))

        patches.append((transformers.AutoConfig, "from_pretrained", for_name))
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    try:
        for obj, attr, value in patches:
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


def small_model(name: str, timm_family: str | None = None, seed: int = 0, **overrides) -> nn.Module:
    """open_clip model ``name`` at random init and reduced size, in eval mode: its text
    tower (open_clip's own) at ``SMALL_TEXT``, its timm trunk shrunk by
    ``TIMM_SMALL[timm_family]``, HF text towers tiny; ``overrides`` replace config keys."""
    import open_clip
    from open_clip.factory import get_model_config

    cfg = get_model_config(name)
    text = dict(cfg["text_cfg"])
    if "hf_model_name" not in text:
        text.update(SMALL_TEXT)
    else:
        text["hf_model_pretrained"] = False  # from the (tiny, local) config, no hub weights
    kwargs = {"text_cfg": text, **overrides}
    torch.manual_seed(seed)
    with offline_builders(TIMM_SMALL.get(timm_family)):
        model = open_clip.create_model(name, pretrained=None, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # non-trivial biases and norms
    return model.eval()
