"""Every tower family at random init and reduced size: a fresh adapter changes nothing,
fused equals plain LoRA (features and LoRA gradients), merge/unmerge restores the weights
bit for bit, the adapter file round-trips, and the trainable count matches a hand count."""

import copy
import math

import pytest
import torch
from clip_models import randomize_adapters, small_model, tiny_tokens

from clip_lora import (
    LoRAConfig,
    count_trainable,
    load_adapter,
    lora_grads,
    lora_state_dict,
    merge,
    merged_state_dict,
    patch_fused,
    patch_reference,
    save_adapter,
    unmerge,
    unpatch,
)
from clip_lora.families import discover
from clip_lora.linear import LoRALinear

SMALL_VIT = {"vision_cfg": {"layers": 2, "width": 64, "head_width": 16, "patch_size": 16, "image_size": 32}}
SMALL_RESNET = {"vision_cfg": {"layers": [1, 1, 1, 1], "width": 8, "head_width": 16, "image_size": 32}}

# id: (open_clip name, timm shrink, config overrides, image size, vision family, text family)
CASES = {
    "siglip2": ("ViT-B-16-SigLIP2", "vit", {}, 32, "timm/VisionTransformer", "open_clip"),
    "pe-core": ("PE-Core-T-16-384", "eva", {}, 32, "timm/Eva", "open_clip"),
    "eva02": ("EVA02-B-16", "eva", {}, 32, "timm/Eva", "open_clip"),
    "eva-qkv-bias": ("EVA02-E-14", "eva", {}, 32, "timm/Eva", "open_clip"),
    "mobileclip2-b": ("MobileCLIP2-B", "hybrid", {}, 32, "timm/VisionTransformer", "open_clip"),
    "swin": ("swin_base_patch4_window7_224", "swin", {}, 56, "timm/SwinTransformer", "open_clip"),
    "resnet": ("RN50", None, SMALL_RESNET, 32, "resnet", "open_clip"),
    "hf-roberta": ("roberta-ViT-B-32", None, SMALL_VIT, 32, "open_clip", "hf/roberta"),
    "hf-mt5": ("mt5-base-ViT-B-32", None, SMALL_VIT, 32, "open_clip", "hf/mt5"),
    "hf-nllb": ("nllb-clip-base-siglip", "vit", {}, 32, "timm/VisionTransformer", "hf/m2m_100"),
}


def _build(case):
    name, timm_family, overrides, size, *_ = CASES[case]
    if CASES[case][5].startswith("hf/"):
        pytest.importorskip("transformers", reason="HF text towers need the test extra's transformers")
    model = small_model(name, timm_family, **overrides)
    vocab = min(int(getattr(model, "vocab_size", 0) or getattr(model.text, "vocab_size", 100)), 100)
    # open_clip text towers take exactly their context length; the tiny HF configs have 40 positions.
    hf = CASES[case][5].startswith("hf/")
    context = 16 if hf else int(getattr(model, "context_length", 0) or model.text.context_length)
    tokens = tiny_tokens(n=3, context=context, vocab=vocab)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model, images, tokens


def _features(model, images, tokens):
    return model.encode_image(images), model.encode_text(tokens)


# Same attention classes as siglip2 / eva02, slower to build (a conv stem, windowing): -m slow.
SLOW = {"mobileclip2-b", "swin"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_family(case, tmp_path):
    model, images, tokens = _build(case)
    assert discover(model, "vision").family == CASES[case][4]
    assert discover(model, "text").family == CASES[case][5]
    base = _features(model, images, tokens)
    original_keys = set(model.state_dict())
    cfg = LoRAConfig(params=("q", "k", "v", "o"), dropout=0.0, pooling_head=True)

    # A fresh adapter (B = 0) changes nothing.  Equal up to fp32 rounding, not bit for bit:
    # the fused kernel's CPU path adds the bias after the GEMM, F.linear fuses it (addmm).
    fused = patch_fused(copy.deepcopy(model), cfg)
    assert original_keys <= set(fused.state_dict())  # the original keys are unchanged
    for a, b in zip(_features(fused, images, tokens), base, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    # Fused equals plain LoRA, features and LoRA gradients, with adapters that act.
    randomize_adapters(fused, std=0.2)
    plain = patch_reference(copy.deepcopy(model), cfg)
    plain.load_state_dict(fused.state_dict())
    out_f, out_p = _features(fused, images, tokens), _features(plain, images, tokens)
    for a, b, c in zip(out_f, out_p, base, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # fp32: the same math, summed in another order
        assert (a - c).abs().max() > 1e-3
    # LoRA gradients against an fp64 copy of the plain model: the fused error is at most
    # twice plain PyTorch's own fp32 error (plus 1e-6 of the gradient, for exact matches).
    reference = patch_reference(copy.deepcopy(model), cfg).double()
    reference.load_state_dict(fused.state_dict())
    grads = []
    for m, dtype in ((fused, torch.float32), (plain, torch.float32), (reference, torch.float64)):
        m.train()
        loss = m.encode_image(images.to(dtype)).square().sum() + m.encode_text(tokens).square().sum()
        loss.backward()
        grads.append([g.double() for g in lora_grads(m).values()])  # per projection, whatever the layout
    for gf, gp, gr in zip(*grads, strict=True):
        assert (gf - gr).norm() <= 2 * (gp - gr).norm() + 1e-6 * gr.norm()
    assert sum(bool(g.abs().max() > 0) for g in grads[0]) >= len(grads[0]) // 2
    fused.eval()
    out_f = _features(fused, images, tokens)  # after train mode moved BatchNorm statistics

    # merge then unmerge restores every frozen weight bit for bit; merged computes the same.
    sd_before = {k: v.clone() for k, v in fused.state_dict().items()}  # (train mode moved BN statistics)
    merge(fused)
    merged_out = _features(fused, images, tokens)
    unmerge(fused)
    for k, v in sd_before.items():
        assert torch.equal(fused.state_dict()[k], v), k
    for a, b in zip(merged_out, out_f, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # W + sBA rounded to fp32 once

    # merged_state_dict is a plain open_clip state dict: the unpatched model loads it strictly
    # and computes what the patched one does.
    plain_copy = copy.deepcopy(model)
    plain_copy.load_state_dict(merged_state_dict(fused), strict=True)
    for a, b in zip(_features(plain_copy.eval(), images, tokens), out_f, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # W + sBA rounded to fp32 once

    # The adapter round-trips into a fresh copy of the unpatched model.
    save_adapter(fused, tmp_path / "a.safetensors")
    loaded = load_adapter(copy.deepcopy(model), tmp_path / "a.safetensors")
    ours, theirs = lora_state_dict(fused), lora_state_dict(loaded)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # The BatchNorm statistics that train mode moved in `fused` (the adapters come from the file).
    loaded.load_state_dict({k: v for k, v in fused.state_dict().items() if ".lora_" not in k}, strict=False)
    for a, b in zip(_features(loaded.eval(), images, tokens), out_f, strict=True):
        assert torch.equal(a, b)

    # unpatch gives back the original modules and the unpatched features.
    unpatch(fused)
    assert not any(isinstance(m, LoRALinear) for m in fused.modules())
    assert set(fused.state_dict()) == original_keys
    model.eval()


def _hand_count(case, model, r=2):
    """Trainable elements for params=("q", "v"), r=2, both towers, all blocks, worked out
    from the projection shapes of each family (A [r, in] + B [out_slot, r] per slot)."""
    per = r * 2  # A and B of a square d x d projection slot: r*d + d*r
    if case == "siglip2":  # timm qkv [3*64, 64]: q and v slots; open_clip text width 64
        return 2 * (2 * per * 64) + 2 * (2 * per * 64)
    if case == "resnet":  # one attention pool, width 8*32 = 256
        return 2 * per * 256 + 2 * (2 * per * 64)
    if case == "hf-roberta":  # query/value 32 x 32 in 2 layers; open_clip ViT width 64
        return 2 * (2 * per * 32) + 2 * (2 * per * 64)
    raise KeyError(case)


@pytest.mark.parametrize("case", ["siglip2", "resnet", "hf-roberta"])
def test_trainable_count_by_hand(case):
    model, _, _ = _build(case)
    patch_fused(model, LoRAConfig(params=("q", "v")))
    assert count_trainable(model) == _hand_count(case, model)


def test_pooling_head_is_opt_in():
    model, _, _ = _build("siglip2")
    off = patch_fused(copy.deepcopy(model), LoRAConfig())
    on = patch_fused(copy.deepcopy(model), LoRAConfig(pooling_head=True))
    assert not any(isinstance(m, LoRALinear) for m in off.visual.trunk.attn_pool.modules())
    pool = on.visual.trunk.attn_pool
    assert isinstance(pool.q, LoRALinear) and pool.kv.slots == ("k", "v") and not isinstance(pool.proj, LoRALinear)
    # q: A [2, 64] + B [64, 2]; kv: k and v slots of 64 rows each
    assert count_trainable(on) - count_trainable(off) == 3 * (2 * 64 + 64 * 2)


def test_position_scales_with_tower_depth():
    model, _, _ = _build("pe-core")
    patched = patch_fused(model, LoRAConfig(encoder="vision", position="top1", params=("o",)))
    blocks = patched.visual.trunk.blocks
    assert isinstance(blocks[1].attn.proj, LoRALinear) and not isinstance(blocks[0].attn.proj, LoRALinear)
    assert not isinstance(blocks[1].attn.qkv, LoRALinear)


@pytest.mark.parametrize(
    ("name", "what"),
    [("convnext_tiny", "no attention layers"), ("MobileCLIP2-S0", "fastvit")],
)
def test_convolutional_towers_are_refused_but_text_adapts(name, what):
    import open_clip
    from clip_models import offline_builders

    with torch.device("meta"), offline_builders():
        model = open_clip.create_model(name, pretrained=None, device="meta")
    with pytest.raises(ValueError, match=f"(?i){what}.*encoder='text'"):
        patch_fused(model, LoRAConfig())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # refused: left as it was
    patch_fused(model, LoRAConfig(encoder="text"))
    assert count_trainable(model) > 0


@pytest.mark.parametrize("case", ["siglip2", "hf-roberta"])
def test_text_trimming_falls_back_where_it_would_not_be_exact(case):
    """SigLIP's text tower has no causal mask and pools the last token; HF towers are
    bidirectional: trimming the context would change their features, so it must not run."""
    from clip_lora.text import _text_tower, encode_text_trimmed

    model, _, tokens = _build(case)
    assert _text_tower(model) is None
    assert torch.equal(encode_text_trimmed(model, tokens), model.encode_text(tokens))
    if case == "siglip2":
        # Trimming really would differ: the last-token pool moves with the context length.
        text = model.text
        short = tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]
        text.context_length = short.shape[1]
        x = text.token_embedding(short) + text.positional_embedding[: short.shape[1]]
        trimmed = text.text_projection(text.ln_final(text.transformer(x))[:, -1])
        assert not torch.allclose(trimmed, model.encode_text(tokens), atol=1e-4)


def test_adapter_metadata_records_the_family(tmp_path):
    from clip_lora.adapters import read_adapter

    model, _, _ = _build("pe-core")
    save_adapter(patch_fused(model, LoRAConfig()), tmp_path / "a.safetensors")
    _, info = read_adapter(tmp_path / "a.safetensors")
    assert info["families"] == {"text": "open_clip", "vision": "timm/Eva"}


def _offline_tokenizer(context: int, vocab: int):
    """Token ids made without the hub tokenizer: one id per word, an end token, padding."""

    def tokenize(texts):
        out = torch.zeros(len(texts), context, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [1 + sum(map(ord, w)) % (vocab - 2) for w in text.split()][: context - 1]
            out[i, : len(ids) + 1] = torch.tensor([*ids, vocab - 1])
        return out

    return tokenize


def test_recipe_trains_siglip2_at_its_own_temperature(tmp_path, monkeypatch):
    """The few-shot recipe on SigLIP2's real architecture (reduced size, random init, token
    ids made offline): it trains, and the loss temperature is the model's logit_scale.exp()."""
    import json

    import open_clip
    from clip_models import TIMM_SMALL, offline_builders
    from open_clip.factory import get_model_config

    from clip_lora.adapters import read_adapter
    from clip_lora.data import make_synthetic
    from clip_lora.train import ADAPTER_FILE, TrainConfig, train

    make_synthetic(str(tmp_path / "data"), num_classes=3, train_per_class=4, test_per_class=3, image_size=32)
    cfg = get_model_config("ViT-B-16-SigLIP2")
    cfg["text_cfg"].update(width=64, heads=4, layers=2)
    cfg["embed_dim"] = 64  # the shrunk trunk's width: SigLIP has no image projection
    (tmp_path / "siglip2-small.json").write_text(json.dumps(cfg))
    context, vocab = cfg["text_cfg"]["context_length"], cfg["text_cfg"]["vocab_size"]
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda name, **kw: _offline_tokenizer(context, vocab))
    run = TrainConfig(
        dataset="synthetic", root=str(tmp_path / "data"), output=str(tmp_path / "run"), shots=2,
        model=str(tmp_path / "siglip2-small.json"), pretrained=None, image_size=32, lr=1e-2, batch_size=6, iterations=3,
        num_workers=0, checkpoint_every=0, zero_shot=False, progress=False,
    )
    with offline_builders(TIMM_SMALL["vit"]):
        metrics = train(run)
    # Random init: open_clip's init_logit_scale, log(1 / 0.07); a checkpoint brings its learnt one.
    assert metrics["logit_scale"] == pytest.approx(1 / 0.07)
    assert metrics["logit_scale_source"] == "model.logit_scale.exp()"
    assert all(map(math.isfinite, metrics["loss_curve"])) and len(metrics["loss_curve"]) == 3
    tensors, info = read_adapter(tmp_path / "run" / ADAPTER_FILE)
    assert info["families"] == {"text": "open_clip", "vision": "timm/VisionTransformer"}
    assert any(k.startswith("visual.trunk.") and "lora_B" in k and t.abs().sum() > 0 for k, t in tensors.items())


def test_coca_pooling_head_is_refused_clearly():
    """CoCa's AttentionalPooler attends from learnt queries to keys/values of another width:
    no LoRAAttention form fits it, so pooling_head=True is refused and nothing changes."""
    import open_clip

    with torch.device("meta"):
        model = open_clip.create_model("coca_ViT-B-32", pretrained=None, device="meta")
    with pytest.raises(ValueError, match="AttentionalPooler.*pooling_head=False"):
        patch_fused(model, LoRAConfig(pooling_head=True))
    assert count_trainable(model) == sum(p.numel() for p in model.parameters())  # untouched, all trainable
    patch_fused(model, LoRAConfig())


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_transformers_clip_and_siglip_models(kind, tmp_path):
    """transformers' own CLIPModel / SiglipModel (optional extra): the same patch on their
    q_proj/k_proj/v_proj/out_proj Linears; SigLIP's probe-attention head is refused."""
    transformers = pytest.importorskip("transformers", reason="transformers' CLIP models need the test extra")
    config_cls, model_cls = {
        "clip": (transformers.CLIPConfig, transformers.CLIPModel),
        "siglip": (transformers.SiglipConfig, transformers.SiglipModel),
    }[kind]
    common = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    text = {**common, "vocab_size": 100, "max_position_embeddings": 16, "bos_token_id": 98, "eos_token_id": 99}
    torch.manual_seed(0)
    model = model_cls(config_cls(text_config=text, vision_config={**common, "image_size": 32, "patch_size": 16})).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(1, 98, (3, 16), generator=torch.Generator().manual_seed(2))

    def features(m):
        return (m.get_image_features(pixel_values=images).pooler_output,
                m.get_text_features(input_ids=tokens).pooler_output)

    base = features(model)
    cfg = LoRAConfig(params=("q", "k", "v", "o"), dropout=0.0)
    fused = patch_fused(copy.deepcopy(model), cfg)
    assert discover(fused, "vision").family == f"transformers/{kind}"
    assert count_trainable(fused) == 2 * 2 * 4 * (2 * 32 + 32 * 2)  # 2 towers x 2 layers x q,k,v,o x (A + B)
    for a, b in zip(features(fused), base, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # B = 0 (bias added after the GEMM: fp32 rounding)
    randomize_adapters(fused, std=0.2)
    plain = patch_reference(copy.deepcopy(model), cfg)
    plain.load_state_dict(fused.state_dict())
    out_f = features(fused)
    for a, b, c in zip(out_f, features(plain), base, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert (a - c).abs().max() > 1e-3
    weights = {k: v.clone() for k, v in fused.state_dict().items()}
    merge(fused)
    unmerge(fused)
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in weights.items())
    save_adapter(fused, tmp_path / "a.safetensors")
    loaded = load_adapter(copy.deepcopy(model), tmp_path / "a.safetensors")
    for a, b in zip(features(loaded.eval()), out_f, strict=True):
        assert torch.equal(a, b)
    if kind == "siglip":
        with pytest.raises(ValueError, match="SiglipMultiheadAttentionPoolingHead.*pooling_head=False"):
            patch_fused(copy.deepcopy(model), LoRAConfig(pooling_head=True))
