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
from clip_lora.adapters import OFFICIAL_L14_VISION


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


def _l14_like(text_depth=12):
    """ViT-L/14's tower depths (text 12, vision 24) at toy width."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=24, width=64, head_width=16, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=16, vocab_size=64, width=32, heads=4, layers=text_depth)
    return CLIP(32, vision, text).eval()


HEAD_L14 = {"all": list(range(24)), "half-up": list(range(12, 24)), "half-bottom": list(range(12))}
OLD_L14 = {"bottom": [0, 1, 2, 3], "up": [8, 9, 10, 11], "half-up": list(range(6, 12)), "all": list(range(21))}


@pytest.mark.parametrize(
    ("version", "position", "encoder"),
    [("HEAD", p, "vision") for p in HEAD_L14]
    + [("pre-e6bf706", p, "vision") for p in OLD_L14]
    + [("HEAD", "half-up", "both"), ("pre-e6bf706", "half-up", "both"), ("HEAD", "all", "both")],
)
def test_official_import_24_block_vision_follows_each_official_version(tmp_path, version, position, encoder):
    # A file laid out as each version of the official code writes it for ViT-L/14 (text
    # blocks first, then vision): HEAD's table (e6bf706 and later) and the older one, which
    # reused the 12-block indices with "all" = 0-20.  The layer count picks the table.
    vision = (HEAD_L14 if version == "HEAD" else OLD_L14)[position]
    text = {"half-up": list(range(6, 12)), "all": list(range(12))}.get(position, []) if encoder == "both" else []
    order = [("text", i) for i in text] + [("vision", i) for i in vision]
    meta = {"r": 2, "alpha": 1, "encoder": encoder, "params": ["q", "k", "v"], "position": position}
    weights = _official_file(tmp_path / "l14.pt", meta, order, {"text": 32, "vision": 64})
    model = load_adapter(_l14_like(), tmp_path / "l14.pt")
    sd = lora_state_dict(model)
    prefix = {"text": "transformer", "vision": "visual.transformer"}
    for tower in ("text", "vision"):
        patched = sorted(int(k.split(".")[-4]) for k in sd if k.startswith(prefix[tower] + ".") and k.endswith("A.q"))
        assert patched == [b for t, b in order if t == tower], tower
    for i, (tower, block) in enumerate(order):
        attn = f"{prefix[tower]}.resblocks.{block}.attn"
        assert torch.equal(sd[f"{attn}.lora_A.k"], weights[f"layer_{i}"]["k_proj"]["w_lora_A"])
        assert torch.equal(sd[f"{attn}.lora_B.v"], weights[f"layer_{i}"]["v_proj"]["w_lora_B"])
    # HEAD's table is ours, so the position keeps its name; the older one needs the explicit list.
    expected = position if version == "HEAD" else tuple(vision)
    assert model.clip_lora_config.position == expected


def test_official_import_24_block_vision_refusals(tmp_path, monkeypatch):
    meta = {"r": 2, "alpha": 1, "encoder": "vision", "params": ["q"], "position": "all"}
    path = tmp_path / "l14.pt"
    # 22 layers fit neither version's "all" (24 at HEAD, 21 before e6bf706).
    _official_file(path, meta, [("vision", i) for i in range(22)], {"vision": 64})
    with pytest.raises(ValueError, match=r"has 22 layers; .* gives 24 \(official HEAD\) or 21 \(official code before"):
        load_adapter(_l14_like(), path)
    # Neither version has top1 for the ViT-L/14 vision tower (a KeyError in the official code).
    _official_file(path, {**meta, "position": "top1"}, [("vision", 23)], {"vision": 64})
    with pytest.raises(ValueError, match="no 'top1' entry for a 24-block .* in any version"):
        load_adapter(_l14_like(), path)
    # Two versions that fit the count with different blocks: refused, not guessed.
    monkeypatch.setitem(OFFICIAL_L14_VISION["pre-e6bf706"], "half-up", list(range(12)))
    _official_file(path, {**meta, "position": "half-up"}, [("vision", i) for i in range(12)], {"vision": 64})
    with pytest.raises(ValueError, match="fit both the official HEAD table and the one before e6bf706"):
        load_adapter(_l14_like(), path)


def test_official_import_old_all_on_both_towers_zeroes_the_extra_blocks(tmp_path):
    # Before e6bf706, "all" on ViT-L/14 was text 0-11 and vision 0-20 (33 layers): no single
    # index list fits both towers, so the model gets our "all" and blocks 21-23 get B = 0.
    order = [("text", i) for i in range(12)] + [("vision", i) for i in range(21)]
    meta = {"r": 2, "alpha": 1, "encoder": "both", "params": ["q", "v"], "position": "all"}
    weights = _official_file(tmp_path / "l14.pt", meta, order, {"text": 32, "vision": 64})
    with pytest.warns(UserWarning, match="did not adapt 3 of this model's patched attentions"):
        model = load_adapter(_l14_like(), tmp_path / "l14.pt")
    blocks = model.visual.transformer.resblocks
    assert torch.equal(blocks[20].attn.lora_B["v"], weights["layer_32"]["v_proj"]["w_lora_B"])
    assert all(not blocks[i].attn.lora_B["q"].any() for i in (21, 22, 23))
