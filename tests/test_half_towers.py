"""Frozen towers stored in the compute dtype: bitwise the autocast result of the fp32
model, within the half type's rounding of the fp32 model, adapters unchanged."""

from __future__ import annotations

import copy
import json
import os

import pytest
import safetensors.torch
import torch
import torch.nn as nn
from clip_models import randomize_adapters, tiny_clip, tiny_tokens

import lora_kernels
from clip_lora import LoRAConfig, lora_parameters, merged_state_dict, patch_fused, patch_reference, save_adapter
from clip_lora.precision import (
    frozen_projection_weights,
    resolve_storage,
    restore_fp32,
    store_frozen_half,
)

HALF = [torch.bfloat16, torch.float16]


def _model(custom: bool, provider=patch_fused) -> nn.Module:
    model = provider(tiny_clip(custom), LoRAConfig(params=("q", "k", "v", "o"), dropout=0.0))
    randomize_adapters(model, std=0.2)
    return model


def _logits(model, images, tokens):
    img = model.encode_image(images, normalize=True)
    txt = model.encode_text(tokens, normalize=True)
    return (100.0 * img.float() @ txt.float().t()).float()


def _inputs():
    g = torch.Generator().manual_seed(4)
    return torch.randn(3, 3, 32, 32, generator=g), tiny_tokens(n=5)


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("custom", [False, True], ids=["MultiheadAttention", "open_clip.Attention"])
def test_what_is_stored_half(custom):
    model = _model(custom)
    store_frozen_half(model, torch.bfloat16)
    half = {n for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
    assert half == set(frozen_projection_weights(model)) and half
    for name, p in model.named_parameters():
        is_projection = any(s in name for s in ("in_proj_", "out_proj.", "c_fc.", "c_proj.", "conv1.", "mlp."))
        if "lora_" in name or "ln" in name or "embedding" in name or name in ("text_projection", "visual.proj"):
            assert p.dtype == torch.float32, name  # LoRA masters, norms, embeddings stay fp32
        elif name.endswith("resblocks.0.mlp.c_fc.weight"):
            assert p.dtype == torch.float32, name  # open_clip reads the cast dtype here: keep the stream fp32
        elif is_projection:
            assert p.dtype == torch.bfloat16, name
    for p in lora_parameters(model):
        assert p.dtype == torch.float32 and p.requires_grad


@pytest.mark.parametrize(
    "custom, provider, dtype",
    [
        (False, patch_fused, torch.bfloat16),
        (True, patch_fused, torch.bfloat16),
        (False, patch_fused, torch.float16),
        (True, patch_fused, torch.float16),
        (True, patch_reference, torch.bfloat16),  # the plain provider: autocast's own casts
    ],
    ids=["MHA-fused-bf16", "Attention-fused-bf16", "MHA-fused-fp16", "Attention-fused-fp16", "Attention-plain-bf16"],
)
def test_half_storage_is_bitwise_autocast(custom, provider, dtype):
    """Same logits and LoRA gradients, bit for bit, as the fp32-stored model under the
    same autocast: autocast's per-call cast is the very rounding that was stored."""
    fp32 = _model(custom, provider).train()
    half = store_frozen_half(copy.deepcopy(fp32), dtype)
    images, tokens = _inputs()
    out = []
    for model in (fp32, half):
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            logits = _logits(model, images, tokens)
        logits.square().mean().backward()
        out.append((logits.detach(), [p.grad.clone() for p in lora_parameters(model)]))
    assert torch.equal(out[0][0], out[1][0])
    for a, b in zip(out[0][1], out[1][1], strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_zero_shot_logits_against_the_fp32_model(dtype):
    """What changes against the fp32 model without autocast: the half type's rounding.

    ‖Δlogits‖ / ‖logits‖ stays within a few units of the format's precision (2⁻⁸ bf16,
    2⁻¹¹ fp16) times the depth; 100·cos amplifies feature errors, hence the bound.
    """
    fp32 = _model(False).eval()
    half = store_frozen_half(copy.deepcopy(fp32), dtype)
    images, tokens = _inputs()
    with torch.no_grad():
        ref = _logits(fp32, images, tokens)
        with torch.autocast("cpu", dtype=dtype):
            got = _logits(half, images, tokens)
    tol = {torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    err = _rel(got, ref)
    assert 0 < err < tol


def test_fused_op_takes_half_weights_with_fp32_adapters():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 48, generator=g, requires_grad=True)
    w = torch.randn(96, 48, generator=g) / 7
    b = torch.randn(96, generator=g)
    a = [torch.randn(2, 48, generator=g, requires_grad=True) for _ in range(3)]
    bb = [torch.randn(32, 2, generator=g, requires_grad=True) for _ in range(3)]
    outs = []
    for weight, bias in ((w, b), (w.bfloat16(), b.bfloat16())):
        for t in (x, *a, *bb):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lora_kernels.lora_linear(x, weight, bias, lora_a=a, lora_b=bb, scale=0.7)
        y.float().square().sum().backward()
        outs.append([y.detach(), x.grad.clone(), *(t.grad.clone() for t in (*a, *bb))])
    for got, ref in zip(outs[1], outs[0], strict=True):
        assert torch.equal(got, ref)
    assert all(t.grad.dtype == torch.float32 for t in (*a, *bb))


def test_adapters_and_merged_state_dict_unchanged(tmp_path):
    fp32 = _model(True)
    half = store_frozen_half(copy.deepcopy(fp32), torch.bfloat16, keep_fp32=True)
    save_adapter(fp32, str(tmp_path / "a.safetensors"))
    save_adapter(half, str(tmp_path / "b.safetensors"))
    a = safetensors.torch.load_file(str(tmp_path / "a.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and b[k].dtype == torch.float32 for k in a)

    ref = merged_state_dict(fp32)
    # Merging into half weights rounds W + ΔW to the half type (documented): the merged
    # weights are bf16 and within bf16 rounding of the fp32 merge.
    rounded = merged_state_dict(half)
    key = next(k for k in ref if k.endswith("in_proj_weight"))
    assert rounded[key].dtype == torch.bfloat16
    assert 0 < _rel(rounded[key].float(), ref[key]) < 2**-8
    # The fp32 originals restore it exactly: the merged state dict is today's, bit for bit.
    restore_fp32(half)
    exact = merged_state_dict(half)
    assert exact.keys() == ref.keys()
    for k in ref:
        assert exact[k].dtype == ref[k].dtype and torch.equal(exact[k], ref[k]), k
    with pytest.raises(ValueError, match="keep_fp32"):
        restore_fp32(half)


def test_storage_follows_precision():
    assert resolve_storage("fp32", "cpu") is None
    assert resolve_storage("auto", "cpu") is None
    assert resolve_storage("fp16", "cpu") is None  # fp16 autocast falls back to fp32 on CPU
    assert resolve_storage("bf16", "cpu") is torch.bfloat16
    assert resolve_storage("fp16", "cuda") is torch.float16
    assert resolve_storage("auto", "cuda") is torch.float16
    model = _model(False)
    before = {n: p.clone() for n, p in model.named_parameters()}
    assert store_frozen_half(model, None) is model
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="float16 or torch.bfloat16"):
        store_frozen_half(model, torch.float64)


def test_bf16_training_run_gives_todays_adapter(tmp_path, monkeypatch):
    """train(precision="bf16") stores the towers in bf16 and ends with the bit-identical
    adapter and metrics of the same run with fp32-stored towers."""
    import clip_lora.train as train_mod
    from clip_lora.cli import DEMO_MODEL_CONFIG
    from clip_lora.data import make_synthetic
    from clip_lora.train import ADAPTER_FILE, TrainConfig, build_model, train

    make_synthetic(str(tmp_path / "data"), num_classes=3, train_per_class=4, test_per_class=3, image_size=32)
    (tmp_path / "tiny.json").write_text(json.dumps(DEMO_MODEL_CONFIG))

    def config(out):
        return TrainConfig(
            dataset="synthetic",
            root=str(tmp_path / "data"),
            output=str(tmp_path / out),
            shots=2,
            model=str(tmp_path / "tiny.json"),
            pretrained=None,
            precision="bf16",
            lr=1e-2,
            iterations=3,
            batch_size=4,
            num_workers=0,
            checkpoint_every=0,
            zero_shot=False,
            progress=False,
        )

    model, _, _ = build_model(config("probe"), torch.device("cpu"))
    assert any(p.dtype == torch.bfloat16 for p in frozen_projection_weights(model).values())
    half = train(config("half"))
    monkeypatch.setattr(train_mod, "store_frozen_half", lambda model, dtype: model)
    full = train(config("fp32"))
    a = safetensors.torch.load_file(os.path.join(tmp_path / "half", ADAPTER_FILE))
    b = safetensors.torch.load_file(os.path.join(tmp_path / "fp32", ADAPTER_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert half["loss_curve"] == full["loss_curve"] and half["accuracy"] == full["accuracy"]
