"""Trimmed text encoding equals the full 77-token run; class prompts follow the paper."""

import copy

import open_clip
import pytest
import torch
from clip_models import randomize_adapters, tiny_clip, tiny_tokens

from clip_lora import LoRAConfig, encode_text_trimmed, patch_fused, patch_reference
from clip_lora.text import class_prompts, encode_class_prompts

PROMPTS = ["a photo of a dog.", "a photo of a large red sports car parked by the sea.", "x", "a photo of a tench."]


@pytest.fixture(scope="module")
def vit_b32():
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    return model.eval()


def _run_lengths(model):
    """Record the sequence length each text-transformer call sees."""
    seen = []
    model.transformer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    return seen


@pytest.mark.parametrize("patch", [None, patch_fused, patch_reference])
def test_trimmed_equals_full_context(vit_b32, patch):
    model = copy.deepcopy(vit_b32)
    if patch is not None:
        patch(model, LoRAConfig(params=("q", "k", "v", "o")))
        randomize_adapters(model)
    tokens = open_clip.get_tokenizer("ViT-B-32")(PROMPTS)
    seen = _run_lengths(model)
    with torch.no_grad():
        full = model.encode_text(tokens, normalize=True)
        trimmed = encode_text_trimmed(model, tokens, normalize=True)
    longest = int(tokens.argmax(-1).max()) + 1
    assert seen == [77, longest] and longest < 20
    assert torch.isfinite(trimmed).all()
    # Same math on fewer rows; only the summation order of attention may differ.
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("custom", [False, True], ids=["MultiheadAttention", "open_clip.Attention"])
def test_trimmed_equals_full_with_gradients(custom):
    model = patch_fused(tiny_clip(custom), LoRAConfig(dropout=0.0)).train()
    randomize_adapters(model, std=0.2)
    tokens = tiny_tokens(n=4)
    grads = []
    for encode in (model.encode_text, lambda t: encode_text_trimmed(model, t)):
        model.zero_grad()
        out = encode(tokens)
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[1][1], grads[0][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_non_causal_tower_falls_back_to_full_run():
    model = tiny_clip(custom=False)
    model.attn_mask = None  # a bidirectional tower: trimming would change the result
    tokens = tiny_tokens()
    seen = _run_lengths(model)
    with torch.no_grad():
        out = encode_text_trimmed(model, tokens)
        assert seen == [16]
        torch.testing.assert_close(out, model.encode_text(tokens), atol=0, rtol=0)


def test_class_prompts(vit_b32):
    assert class_prompts(["golden_retriever", "cat"]) == ["a photo of a golden retriever.", "a photo of a cat."]
    assert class_prompts(["x_y"], template="{} texture") == ["x y texture"]
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    with torch.no_grad():
        feats = encode_class_prompts(vit_b32, tokenizer, ["golden_retriever", "sea_lion"])
        prompts = ["a photo of a golden retriever.", "a photo of a sea lion."]
        ref = vit_b32.encode_text(tokenizer(prompts), normalize=True)
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2))
