"""Adapter files: save/load round trips, mismatch messages, atomic writes, and import of
the official CLIP-LoRA ``.pt`` layout from a file written here by hand.

A small real open_clip CLIP with 12-block towers keeps these fast; the layer numbering
of the official format only depends on the tower depths.
"""

import copy
import math
import os
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from clip_models import randomize_adapters, tiny_clip, tiny_tokens

from clip_lora import LoRAConfig, load_adapter, lora_state_dict, merge, patch_fused, patch_reference, save_adapter


@torch.no_grad()
def _outputs(model, images, tokens):
    return model.encode_image(images), model.encode_text(tokens)


@pytest.fixture(scope="module")
def base():
    return tiny_clip(custom=False, depth=12)


@pytest.fixture(scope="module")
def inputs():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8)), tiny_tokens()


def _assert_same_adapters(a, b):
    sa, sb = lora_state_dict(a), lora_state_dict(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_round_trip_into_patched_and_unpatched(base, inputs, tmp_path):
    cfg = LoRAConfig(r=3, params=("q", "v", "o"), position="half-up")
    model = patch_fused(copy.deepcopy(base), cfg).eval()
    randomize_adapters(model)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)

    # Into a freshly patched model (other random A, zero B) ...
    target = patch_reference(copy.deepcopy(base), cfg).eval()
    load_adapter(target, path)
    _assert_same_adapters(target, model)
    for x, y in zip(_outputs(target, *inputs), _outputs(model, *inputs), strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)  # fused vs plain provider
    # ... and into an unpatched one, which gets patched with the file's config.
    fresh = copy.deepcopy(base)
    load_adapter(fresh, path)
    assert fresh.clip_lora_config == cfg
    _assert_same_adapters(fresh, model)
    for x, y in zip(_outputs(fresh.eval(), *inputs), _outputs(model, *inputs), strict=True):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_merged_model_saves_its_adapters_and_refuses_loads(base, tmp_path):
    model = patch_fused(copy.deepcopy(base))
    randomize_adapters(model)
    merge(model)
    save_adapter(model, tmp_path / "a.safetensors")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "a.safetensors")
    _assert_same_adapters(loaded, model)
    with pytest.raises(ValueError, match="unmerge"):
        load_adapter(model, tmp_path / "a.safetensors")


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (LoRAConfig(r=4), "r: file has 2, model has 4"),
        (LoRAConfig(params=("q", "k")), r"params: file has \('q', 'k', 'v'\), model has \('q', 'k'\)"),
        (LoRAConfig(encoder="vision"), "encoder: file has 'both', model has 'vision'"),
        (LoRAConfig(scaling="alpha/r"), "scaling: file has 'alpha/sqrt\\(r\\)', model has 'alpha/r'"),
        (LoRAConfig(position="top2"), "position: file has 'all', model has 'top2'"),
    ],
)
def test_mismatched_config_names_the_difference(base, tmp_path, other, message):
    model = patch_fused(copy.deepcopy(base))
    path = tmp_path / "a.safetensors"
    save_adapter(model, path)
    with pytest.raises(ValueError, match=message):
        load_adapter(patch_fused(copy.deepcopy(base), other), path)


def test_mismatched_architecture_names_the_difference(base, tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(patch_fused(copy.deepcopy(base)), path)
    with pytest.raises(ValueError, match="text layers is 12 in the file, 2 in the model"):
        load_adapter(tiny_clip(custom=False, depth=2), path)
    model = patch_fused(copy.deepcopy(base))
    model.clip_lora_model_name = "ViT-B-32"
    save_adapter(model, path)
    other = copy.deepcopy(base)
    other.clip_lora_model_name = "ViT-B-16"
    with pytest.raises(ValueError, match="saved for model 'ViT-B-32', this model is 'ViT-B-16'"):
        load_adapter(other, path)


def test_dropout_does_not_block_loading(base, tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(patch_fused(copy.deepcopy(base), LoRAConfig(dropout=0.25)), path)
    load_adapter(patch_fused(copy.deepcopy(base), LoRAConfig(dropout=0.0)), path)


def test_save_is_atomic(base, tmp_path, monkeypatch):
    model = patch_fused(copy.deepcopy(base))
    path = tmp_path / "a.safetensors"
    save_adapter(model, path)
    before = path.read_bytes()

    def crash_mid_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial header")
        raise OSError("disk full")

    randomize_adapters(model)
    monkeypatch.setattr(safetensors.torch, "save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]  # the temporary file is gone too


def test_unpatched_model_cannot_be_saved(base, tmp_path):
    with pytest.raises(ValueError, match="not patched"):
        save_adapter(copy.deepcopy(base), tmp_path / "a.safetensors")


def test_non_adapter_file_is_rejected(tmp_path, base):
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"w": torch.randn(2)}, str(path))
    with pytest.raises(ValueError, match="not a clip_lora adapter file"):
        load_adapter(copy.deepcopy(base), path)


# -----------------------------------------------------------------------------
# Official CLIP-LoRA .pt files
# -----------------------------------------------------------------------------


def _official_save_lora(path, args, list_lora_layers):
    """What the official ``save_lora`` (loralib/utils.py) writes, restated on stand-in
    layers (objects with ``q_proj``/``k_proj``/``v_proj``/``proj`` holding
    ``w_lora_A`` [r, d_in] and ``w_lora_B`` [d_out, r]), minus its folder naming."""
    weights = {}
    for i, layer in enumerate(list_lora_layers):
        layer_weights = {}
        if "q" in args["params"]:
            layer_weights["q_proj"] = {"w_lora_A": layer.q_proj.w_lora_A, "w_lora_B": layer.q_proj.w_lora_B}
        if "k" in args["params"]:
            layer_weights["k_proj"] = {"w_lora_A": layer.k_proj.w_lora_A, "w_lora_B": layer.k_proj.w_lora_B}
        if "v" in args["params"]:
            layer_weights["v_proj"] = {"w_lora_A": layer.v_proj.w_lora_A, "w_lora_B": layer.v_proj.w_lora_B}
        if "o" in args["params"]:
            layer_weights["proj"] = {"w_lora_A": layer.proj.w_lora_A, "w_lora_B": layer.proj.w_lora_B}
        weights[f"layer_{i}"] = layer_weights
    metadata = {
        "r": args["r"],
        "alpha": args["alpha"],
        "encoder": args["encoder"],
        "params": args["params"],
        "position": args["position"],
    }
    torch.save({"weights": weights, "metadata": metadata}, path)
    return weights


def _official_file(path, meta, blocks, width_of, seed=9):
    """An official file whose ``layer_i`` is the i-th (tower, block) of ``blocks``: one
    stand-in ``PlainMultiheadAttentionLoRA`` per entry, in ``apply_lora``'s order."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for tower, _block in blocks:
        d, r = width_of[tower], meta["r"]
        projs = {
            name: SimpleNamespace(w_lora_A=torch.randn(r, d, generator=g), w_lora_B=torch.randn(d, r, generator=g))
            for name in ("q_proj", "k_proj", "v_proj", "proj")
        }
        layers.append(SimpleNamespace(**projs))
    return _official_save_lora(path, meta, layers)


def test_official_import_text_first_then_vision(base, inputs, tmp_path):
    meta = {"r": 2, "alpha": 1, "encoder": "both", "params": ["q", "k", "v", "o"], "position": "up"}
    # Our reading of the official enumeration: text blocks 8-11, then vision blocks 8-11.
    order = [("text", i) for i in range(8, 12)] + [("vision", i) for i in range(8, 12)]
    path = tmp_path / "lora_weights.pt"
    weights = _official_file(path, meta, order, {"text": 32, "vision": 64})

    model = load_adapter(copy.deepcopy(base), path)  # unpatched: patched from the metadata
    cfg = model.clip_lora_config
    assert (cfg.r, cfg.alpha, cfg.params, cfg.position, cfg.scaling) == (
        2,
        1.0,
        ("q", "k", "v", "o"),
        "up",
        "alpha/sqrt(r)",
    )
    sd = lora_state_dict(model)
    prefix = {"text": "transformer", "vision": "visual.transformer"}
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "proj"}
    for i, (tower, block) in enumerate(order):
        for p, key in names.items():
            attn = f"{prefix[tower]}.resblocks.{block}.attn"
            assert torch.equal(sd[f"{attn}.lora_A.{p}"], weights[f"layer_{i}"][key]["w_lora_A"])
            assert torch.equal(sd[f"{attn}.lora_B.{p}"], weights[f"layer_{i}"][key]["w_lora_B"])
    out = _outputs(model.eval(), *inputs)
    assert (out[0] - _outputs(base, *inputs)[0]).abs().max() > 1e-3

    # A model patched with a different config is refused, naming the field.
    with pytest.raises(ValueError, match="position: file has 'up', model has 'all'"):
        load_adapter(patch_fused(copy.deepcopy(base)), path)


def test_official_import_vision_top_and_layer_count(base, tmp_path):
    meta = {"r": 2, "alpha": 1, "encoder": "vision", "params": ["q", "v"], "position": "top"}
    path = tmp_path / "vision.pt"
    weights = _official_file(path, meta, [("vision", 11)], {"vision": 64})
    model = load_adapter(copy.deepcopy(base), path)
    assert model.clip_lora_config.position == "top1"
    attn = model.visual.transformer.resblocks[11].attn
    assert torch.equal(attn.lora_B["v"], weights["layer_0"]["v_proj"]["w_lora_B"])

    bad = tmp_path / "bad.pt"
    _official_file(bad, meta, [("vision", 10), ("vision", 11)], {"vision": 64})
    with pytest.raises(ValueError, match="has 2 layers; .* gives 1"):
        load_adapter(copy.deepcopy(base), bad)


def test_official_import_computes_the_official_math(base, inputs, tmp_path):
    # The official LinearLoRA adds x (B A)^T * alpha/sqrt(r) to each adapted projection
    # (loralib/layers.py: merge_BA = B @ A, scaling = lora_alpha / math.sqrt(r)); q/k/v are
    # the row blocks of the packed in_proj_weight, "proj" is out_proj.
    meta = {"r": 4, "alpha": 3, "encoder": "vision", "params": ["q", "o"], "position": "half-up"}
    order = [("vision", i) for i in range(6, 12)]
    weights = _official_file(tmp_path / "v.pt", meta, order, {"vision": 64})
    for layer in weights.values():  # B is zero-initialised there; keep the update moderate
        for entry in layer.values():
            entry["w_lora_B"].mul_(0.05)
    torch.save({"weights": weights, "metadata": meta}, tmp_path / "v.pt")
    model = load_adapter(copy.deepcopy(base), tmp_path / "v.pt").eval()

    expected = copy.deepcopy(base)
    scale = meta["alpha"] / math.sqrt(meta["r"])
    with torch.no_grad():
        for i, (_, block) in enumerate(order):
            attn = expected.visual.transformer.resblocks[block].attn
            q, o = weights[f"layer_{i}"]["q_proj"], weights[f"layer_{i}"]["proj"]
            attn.in_proj_weight[:64] += scale * q["w_lora_B"] @ q["w_lora_A"]
            attn.out_proj.weight += scale * o["w_lora_B"] @ o["w_lora_A"]
    got, want = _outputs(model, *inputs), _outputs(expected, *inputs)
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)  # text tower: no adapter
    assert (got[0] - _outputs(base, *inputs)[0]).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("position", "official"),
    [("up", list(range(8, 12))), ("half-up", list(range(6, 12))), ("all", list(range(21)))],
)
def test_official_import_24_block_vision_uses_the_official_table(tmp_path, position, official):
    # The official ViT-L/14 vision table reuses the 12-block indices ("up" = 8-11, not
    # 16-23) and its "all" stops at block 20: an unpatched model is patched on exactly those.
    base24 = tiny_clip(custom=False, depth=24)
    meta = {"r": 2, "alpha": 1, "encoder": "vision", "params": ["q", "k", "v"], "position": position}
    weights = _official_file(tmp_path / "l14.pt", meta, [("vision", i) for i in official], {"vision": 64})
    model = load_adapter(copy.deepcopy(base24), tmp_path / "l14.pt")
    assert model.clip_lora_config.position == tuple(official)
    patched = sorted(int(k.split(".")[3]) for k in lora_state_dict(model) if k.endswith("lora_A.q"))
    assert patched == official
    for i, block in enumerate(official):
        attn = model.visual.transformer.resblocks[block].attn
        assert torch.equal(attn.lora_A["k"], weights[f"layer_{i}"]["k_proj"]["w_lora_A"])
        assert torch.equal(attn.lora_B["v"], weights[f"layer_{i}"]["v_proj"]["w_lora_B"])
