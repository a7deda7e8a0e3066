"""Patching real open_clip models: equality with the original, providers, both attention
forms, parameter counts, merge/unmerge, state dicts, unpatch and a few training steps.

Models are open_clip's real architectures with ``pretrained=None`` (random init, no
download).  fp32 comparisons use atol 2e-5 on features of magnitude ~1: the patched path
runs the same math with a different summation order (one packed GEMM + SDPA instead of
MultiheadAttention's kernels), so bitwise equality is not expected.
"""

import copy

import open_clip
import pytest
import torch
import torch.nn as nn
from clip_models import randomize_adapters, tiny_clip, tiny_tokens
from open_clip.transformer import Attention, ResidualAttentionBlock

from clip_lora import (
    LoRAAttention,
    LoRAConfig,
    count_trainable,
    create_model,
    load_base_state_dict,
    lora_grads,
    lora_parameters,
    lora_state_dict,
    merge,
    merged_state_dict,
    patch_fused,
    patch_reference,
    unmerge,
    unpatch,
)
from clip_lora.attention import is_causal_mask

ATOL, RTOL = 2e-5, 1e-5
PROMPTS = ["a photo of a dog.", "a photo of a large red sports car.", "a photo of a tench, a type of fish."]


def _open_clip(name: str) -> nn.Module:
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=None)
    return model.eval()


@pytest.fixture(scope="module")
def vit_b32():
    return _open_clip("ViT-B-32")


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 224, 224, generator=g)
    tokens = open_clip.get_tokenizer("ViT-B-32")(PROMPTS)
    return images, tokens


@torch.no_grad()
def _features(model, images, tokens):
    return model.encode_image(images), model.encode_text(tokens)


@pytest.fixture(scope="module")
def b32_features(vit_b32, inputs):
    """The unpatched ViT-B/32's (image, text) features: the reference of most tests."""
    return _features(vit_b32, *inputs)


def _assert_close(a, b, atol=ATOL, rtol=RTOL):
    for x, y in zip(a, b, strict=True):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


# -----------------------------------------------------------------------------
# Equality with the unpatched model, providers
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16"])
def test_fresh_adapter_changes_nothing(name, vit_b32, inputs, b32_features):
    model = vit_b32 if name == "ViT-B-32" else _open_clip(name)
    images, tokens = inputs
    reference = b32_features if name == "ViT-B-32" else _features(model, images, tokens)
    patched = patch_fused(copy.deepcopy(model), LoRAConfig(params=("q", "k", "v", "o"))).eval()
    assert sum(isinstance(m, LoRAAttention) for m in patched.modules()) == 24
    _assert_close(_features(patched, images, tokens), reference)


def test_fused_equals_plain_provider(vit_b32, inputs, b32_features):
    images, tokens = inputs
    cfg = LoRAConfig(params=("q", "v", "o"))
    fused = patch_fused(copy.deepcopy(vit_b32), cfg).eval()
    randomize_adapters(fused)
    plain = patch_reference(copy.deepcopy(vit_b32), cfg).eval()
    plain.load_state_dict(fused.state_dict())
    out_fused, out_plain = _features(fused, images, tokens), _features(plain, images, tokens)
    _assert_close(out_fused, out_plain)
    # The adapters really act: the patched features moved away from the base model.
    base = b32_features
    assert (out_fused[0] - base[0]).abs().max() > 1e-2 and (out_fused[1] - base[1]).abs().max() > 1e-2


@pytest.mark.parametrize("custom", [False, True], ids=["MultiheadAttention", "open_clip.Attention"])
def test_both_attention_forms_outputs_and_gradients(custom):
    model = tiny_clip(custom)
    images, tokens = torch.randn(2, 3, 32, 32), tiny_tokens()
    reference = _features(model, images, tokens)
    cfg = LoRAConfig(params=("q", "k", "v", "o"), dropout=0.0)
    fused = patch_fused(copy.deepcopy(model), cfg)
    form = "attention" if custom else "mha"
    assert all(m.form == form for m in fused.modules() if isinstance(m, LoRAAttention))
    _assert_close(_features(fused.eval(), images, tokens), reference)

    randomize_adapters(fused, std=0.2)
    plain = patch_reference(copy.deepcopy(model), cfg)
    plain.load_state_dict(fused.state_dict())
    grads = []
    for m in (fused.train(), plain.train()):
        loss = m.encode_image(images).square().sum() + m.encode_text(tokens).square().sum()
        loss.backward()
        grads.append(list(lora_grads(m).values()))  # per projection, whatever the layout
    for gf, gp in zip(*grads, strict=True):
        assert gf.abs().max() > 0
        torch.testing.assert_close(gf, gp, atol=1e-4, rtol=1e-4)  # fp32 grads through 2 blocks, sums of ~1e2 terms


def test_batch_first_false_and_explicit_masks():
    """nn.MultiheadAttention in sequence-first layout, with additive and boolean masks."""
    torch.manual_seed(4)
    block = ResidualAttentionBlock(32, 4, batch_first=False).eval()
    x = torch.randn(7, 2, 32)  # [L, N, D]
    additive = torch.randn(7, 7)
    blocked = torch.rand(2 * 4, 7, 7) < 0.3
    blocked[..., 0] = False  # every query keeps one key: no all -inf rows
    patched = copy.deepcopy(block)
    patched.attn = LoRAAttention(patched.attn, params=("q", "k"), r=2, scale=1.0, dropout=0.0)
    with torch.no_grad():
        for mask in (None, additive):
            torch.testing.assert_close(patched(x, attn_mask=mask), block(x, attn_mask=mask), atol=ATOL, rtol=RTOL)
        ref = block.attn(x, x, x, need_weights=False, attn_mask=blocked)[0]
        out = patched.attn(x, x, x, need_weights=False, attn_mask=blocked)[0]
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


def test_attention_form_with_masks():
    torch.manual_seed(5)
    attn = Attention(32, 4, qk_norm=True, scale_heads=True, inner_norm=True).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    lora = LoRAAttention(copy.deepcopy(attn), params=("v",), r=3, scale=0.5, dropout=0.0)
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        for mask in (None, torch.randn(6, 6), torch.randn(2 * 4, 6, 6)):
            torch.testing.assert_close(lora(x, attn_mask=mask), attn(x, attn_mask=mask), atol=ATOL, rtol=RTOL)


def test_unsupported_attention_is_rejected():
    block = ResidualAttentionBlock(32, 4)
    block.attn = nn.Linear(32, 32)
    with pytest.raises(TypeError, match="torch.nn.modules.linear.Linear"):
        LoRAAttention(block.attn, params=("q",), r=2, scale=1.0, dropout=0.0)
    with pytest.raises(ValueError, match="scaled_cosine=True is not supported"):
        LoRAAttention(Attention(32, 4, scaled_cosine=True), params=("q",), r=2, scale=1.0, dropout=0.0)
    with pytest.raises(ValueError, match="kdim/vdim"):
        LoRAAttention(nn.MultiheadAttention(32, 4, kdim=16, vdim=16), params=("q",), r=2, scale=1.0, dropout=0.0)
    model = tiny_clip(custom=False)
    model.visual.transformer.resblocks[1].attn = nn.Identity()
    with pytest.raises(TypeError, match="Identity"):
        patch_fused(model)
    # Nothing was patched: replacements are all built before any is installed.
    assert not any(isinstance(m, LoRAAttention) for m in model.modules())
    with pytest.raises(ValueError, match="already patched"):
        patch_fused(patch_fused(tiny_clip(custom=False)))


def test_causal_mask_detection():
    causal = torch.full((5, 5), float("-inf")).triu(1)
    assert is_causal_mask(causal, 5)
    assert is_causal_mask(torch.ones(5, 5, dtype=torch.bool).triu(1), 5)
    assert not is_causal_mask(causal, 4)
    assert not is_causal_mask(torch.full((5, 5), float("-inf")).triu(2), 5)
    assert not is_causal_mask(None, 5)
    edited = causal.clone()
    assert is_causal_mask(edited, 5)
    edited[0, 1] = 0.0  # an in-place edit must invalidate the remembered verdict
    assert not is_causal_mask(edited, 5)


def test_dropout_draws_a_fresh_mask_each_call():
    model = patch_fused(tiny_clip(custom=False), LoRAConfig(dropout=0.5)).train()
    randomize_adapters(model, std=0.5)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(7)
        a = model.encode_image(images)
        b = model.encode_image(images)
        torch.manual_seed(7)
        c = model.encode_image(images)
    assert (a - b).abs().max() > 1e-3  # a new seed per call
    torch.testing.assert_close(a, c, atol=0, rtol=0)  # reproducible from torch's generator


# -----------------------------------------------------------------------------
# Trainable parameter counts (hand computed: 2·r·width per adapted projection)
# -----------------------------------------------------------------------------


def test_paper_count_vit_b16():
    model = patch_fused(_open_clip("ViT-B-16"))
    # text: 12 blocks · 3 · 2·2·512 = 73,728; vision: 12 · 3 · 2·2·768 = 110,592
    assert count_trainable(model) == 184_320
    assert sum(p.numel() for p in lora_parameters(model)) == 184_320


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (LoRAConfig(encoder="vision"), 110_592),  # 12·3·4·768
        (LoRAConfig(encoder="text", params=("q", "v")), 49_152),  # 12·2·4·512
        (LoRAConfig(position="top3"), 46_080),  # 3·3·4·(512+768)
        (LoRAConfig(params=("q", "k", "v", "o")), 245_760),  # 12·4·4·(512+768)
        (LoRAConfig(r=4), 368_640),  # 12·3·8·(512+768)
        (LoRAConfig(r=8, encoder="vision", params=("o",), position=(0, 5)), 24_576),  # 2·1·16·768
        (LoRAConfig(position="half-bottom", params=("k",)), 30_720),  # 6·1·4·(512+768)
    ],
)
def test_counts(vit_b32, cfg, expected):
    model = patch_fused(copy.deepcopy(vit_b32), cfg)
    assert count_trainable(model) == expected
    assert all(p.requires_grad for p in lora_parameters(model))
    patched = {n.rsplit(".attn", 1)[0] for n, m in model.named_modules() if isinstance(m, LoRAAttention)}
    prefix = {"text": "transformer", "vision": "visual.transformer"}
    want = {f"{prefix[t]}.resblocks.{i}" for t in cfg.towers for i in cfg.blocks(12)}
    assert patched == want


# -----------------------------------------------------------------------------
# merge / unmerge / state dicts / unpatch
# -----------------------------------------------------------------------------


@torch.no_grad()
def _logits(model, images, tokens):
    img, txt = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
    return 100.0 * img @ txt.T


def test_merge_unmerge_and_merged_state_dict(vit_b32, inputs):
    images, tokens = inputs
    model = patch_fused(copy.deepcopy(vit_b32), LoRAConfig(params=("q", "k", "v", "o"))).eval()
    randomize_adapters(model)
    base_weight = model.transformer.resblocks[3].attn.in_proj_weight.clone()
    base_out_weight = model.visual.transformer.resblocks[0].attn.out_proj.weight.clone()
    before = _logits(model, images, tokens)

    merge(model)
    assert not torch.equal(model.transformer.resblocks[3].attn.in_proj_weight, base_weight)
    # Folding changes the summation order only: logits of scale 100 agree to ~1e-3.
    torch.testing.assert_close(_logits(model, images, tokens), before, atol=5e-4, rtol=1e-5)
    merged_sd = merged_state_dict(model)

    unmerge(model)
    assert torch.equal(model.transformer.resblocks[3].attn.in_proj_weight, base_weight)
    torch.testing.assert_close(_logits(model, images, tokens), before, atol=0, rtol=0)

    # The merged state dict (also computable unmerged) is a plain open_clip one.
    torch.testing.assert_close(merged_state_dict(model), merged_sd, atol=1e-6, rtol=0)
    plain = copy.deepcopy(vit_b32)
    plain.load_state_dict(merged_sd, strict=True)
    assert not torch.equal(plain.visual.transformer.resblocks[0].attn.out_proj.weight, base_out_weight)
    torch.testing.assert_close(_logits(plain, images, tokens), before, atol=5e-4, rtol=1e-5)


def test_open_clip_checkpoints_load_both_ways(vit_b32, inputs, b32_features):
    images, tokens = inputs
    # open_clip -> patched: a patched model of other weights takes vit_b32's checkpoint.
    torch.manual_seed(11)
    other, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    patched = patch_fused(other).eval()
    with pytest.raises(RuntimeError, match="lora_A"):
        patched.load_state_dict(vit_b32.state_dict(), strict=True)
    load_base_state_dict(patched, vit_b32.state_dict())
    _assert_close(_features(patched, images, tokens), b32_features)
    bad = dict(vit_b32.state_dict(), extra_key=torch.zeros(1))
    with pytest.raises(ValueError, match="unexpected \\['extra_key'\\]"):
        load_base_state_dict(patched, bad)

    # patched -> open_clip: its state dict without the LoRA keys loads strictly.
    randomize_adapters(patched)
    base_only = {k: v for k, v in patched.state_dict().items() if k not in lora_state_dict(patched)}
    fresh = tiny_clip(custom=False, depth=12)  # a wrong architecture is refused ...
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(base_only, strict=True)
    fresh = copy.deepcopy(vit_b32)  # ... the right one loads strictly
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(base_only, strict=True)
    _assert_close(_features(fresh, images, tokens), b32_features)


def test_unpatch_restores_modules_outputs_and_flags(vit_b32, inputs, b32_features):
    images, tokens = inputs
    model = copy.deepcopy(vit_b32)
    model.logit_scale.requires_grad_(False)  # a pre-existing freeze must survive the round trip
    reference = b32_features
    patch_fused(model, LoRAConfig(params=("q", "o"), position="up"))
    randomize_adapters(model)
    merge(model)  # unpatch must unmerge first
    unpatch(model)
    assert not any(isinstance(m, LoRAAttention) for m in model.modules())
    attn = model.transformer.resblocks[9].attn
    assert type(attn) is nn.MultiheadAttention
    assert not hasattr(model, "clip_lora_config")
    assert not model.logit_scale.requires_grad and model.visual.conv1.weight.requires_grad
    assert set(model.state_dict()) == set(vit_b32.state_dict())
    _assert_close(_features(model, images, tokens), reference, atol=0, rtol=0)


def test_repr_shows_what_was_patched(vit_b32):
    model = patch_reference(copy.deepcopy(vit_b32), LoRAConfig(r=4, params=("q", "v"), position="top1"))
    text = repr(model.visual.transformer.resblocks[11].attn)
    for part in ("form=mha", "params=q,v", "r=4", "scale=0.5", "dropout=0.25", "provider=plain"):
        assert part in text
    assert model.clip_lora_config.position == "top1"


# -----------------------------------------------------------------------------
# Training through the patched model, and create_model
# -----------------------------------------------------------------------------


def test_training_steps_change_only_lora(vit_b32, inputs):
    images, tokens = inputs
    # Seeded: the dropout masks (and so the two steps) must not depend on test order.
    torch.manual_seed(0)
    model = patch_fused(copy.deepcopy(vit_b32))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    start = {k: v.clone() for k, v in lora_state_dict(model).items()}
    labels = torch.tensor([0, 2])
    opt = torch.optim.AdamW(lora_parameters(model), lr=2e-3, weight_decay=1e-2)

    def loss_fn():
        img = model.encode_image(images, normalize=True)
        txt = model.encode_text(tokens, normalize=True)
        return nn.functional.cross_entropy(100.0 * img @ txt.T, labels)

    model.eval()
    with torch.no_grad():
        initial = loss_fn().item()
    model.train()
    for _ in range(3):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        final = loss_fn().item()
    assert final < initial - 0.1, (initial, final)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert all(not torch.equal(after[k], v) for k, v in start.items())


def test_create_model():
    model, preprocess_train, preprocess_val, tokenizer = create_model(
        "ViT-B/32", pretrained=None, lora=LoRAConfig(encoder="text"), fused=False
    )
    assert model.clip_lora_model_name == "ViT-B-32"
    assert model.clip_lora_provider == "plain"
    assert count_trainable(model) == 73_728  # 12·3·4·512
    assert tokenizer(["a photo of a cat."]).shape == (1, 77)
    assert callable(preprocess_train) and callable(preprocess_val)
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-B-17'; closest: .*ViT-B-16"):
        create_model("ViT-B-17")


@pytest.mark.parametrize("custom", [False, True], ids=["MultiheadAttention", "open_clip.Attention"])
def test_bf16_autocast_error_within_twice_plain(custom):
    """flash-attention's rule: under bf16 autocast the fused path's error against the fp32
    result is at most about twice plain PyTorch's; adapter gradients stay fp32."""
    model = tiny_clip(custom)
    cfg = LoRAConfig(params=("q", "k", "v", "o"))
    fused = patch_fused(copy.deepcopy(model), cfg).eval()
    randomize_adapters(fused, std=0.2)
    plain = patch_reference(copy.deepcopy(model), cfg).eval()
    plain.load_state_dict(fused.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = fused.encode_image(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            err = [(m.encode_image(images).float() - reference).norm() / reference.norm() for m in (fused, plain)]
    assert 1e-4 < err[0] <= 2 * err[1] + 1e-3, err
    fused.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused.encode_image(images).float().square().sum().backward()
    grads = [p.grad for p in lora_parameters(fused.visual)]  # the text tower took no part
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().max() > 0 for g in grads)


@pytest.mark.slow
def test_vit_l14_count_and_fresh_adapter(request):
    # Nothing deselects "slow" by default (CI runs plain `pytest -q`), so opt in with -m slow.
    if "slow" not in (request.config.getoption("-m") or "") or "not slow" in request.config.getoption("-m"):
        pytest.skip("ViT-L/14 on CPU is slow; run with -m slow")
    model = _open_clip("ViT-L-14")
    images = torch.randn(1, 3, 224, 224)
    tokens = open_clip.get_tokenizer("ViT-L-14")(PROMPTS[:2])
    reference = _features(model, images, tokens)
    patch_fused(model)
    # text: 12 · 3 · 2·2·768 = 110,592; vision (24 blocks): 24 · 3 · 2·2·1024 = 294,912
    assert count_trainable(model) == 405_504
    _assert_close(_features(model, images, tokens), reference)
