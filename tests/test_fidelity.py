"""Fidelity to the paper's model: OpenAI's weights run with QuickGELU, the default weights
are OpenAI's, and missing weights fail at once instead of turning into a random init.

Offline: every "OpenAI checkpoint" here is a random-init model saved to tmp_path in one of
OpenAI's layouts, and the tag path has open_clip's download replaced; nothing downloads.
"""

import json
import os
import subprocess
import sys
import warnings

import open_clip
import pytest
import safetensors.torch
import torch
from open_clip.transformer import QuickGELU

from clip_lora import create_model, load_adapter
from clip_lora.adapters import read_adapter
from clip_lora.cli import DEMO_MODEL_CONFIG, build_parser, main
from clip_lora.data import make_synthetic
from clip_lora.model import OPENAI_JIT_KEYS, mlp_activation, resolve_weights
from clip_lora.train import TrainConfig, register_model_config, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "clip-lora-fidelity-tiny"  # open_clip's CLIP at toy size; GELU, like the plain ViT-B-16 config


def _activations(model):
    """The MLP activation class of every block of both towers."""
    return {type(b.mlp.gelu) for t in (model.transformer, model.visual.transformer) for b in t.resblocks}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model-config JSON path, registered name, a random-init state dict standing in for OpenAI's weights)."""
    folder = tmp_path_factory.mktemp("fidelity")
    path = folder / f"{TINY}.json"
    path.write_text(json.dumps(DEMO_MODEL_CONFIG))
    name = register_model_config(str(path))
    torch.manual_seed(5)
    model = open_clip.create_model(name, pretrained=None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    # OpenAI ships fp16 weights.
    return str(path), name, {k: v.half() for k, v in model.state_dict().items()}


def _openai_state_dict(state):
    """What ``torch.save(clip.load(name, jit=True)[0].state_dict())`` holds: the weights
    plus the JIT model's input_resolution/context_length/vocab_size entries."""
    extra = {
        "input_resolution": torch.tensor(32),
        "context_length": torch.tensor(77),
        "vocab_size": torch.tensor(49408),
    }
    return {**state, **extra}


def _assert_weights(model, state):
    own = model.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k], v.to(own[k].dtype)), k


def test_openai_state_dict_gets_quickgelu(tiny, tmp_path):
    _, name, state = tiny
    path = tmp_path / "ViT-tiny-openai.pt"
    torch.save(_openai_state_dict(state), path)
    assert set(OPENAI_JIT_KEYS) <= set(torch.load(path, weights_only=True))

    model = create_model(name, pretrained=str(path), lora=None)[0]
    assert _activations(model) == {QuickGELU} and mlp_activation(model) == "quickgelu"
    _assert_weights(model, state)  # loaded, not a random init

    # GELU on OpenAI's weights is refused ... unless asked for on purpose.
    with pytest.raises(ValueError, match="only OpenAI's CLIP state dict carries, but activation='gelu'"):
        create_model(name, pretrained=str(path), lora=None, activation="gelu")
    forced = create_model(name, pretrained=str(path), lora=None, activation="gelu", allow_activation_mismatch=True)[0]
    assert _activations(forced) == {torch.nn.GELU}
    _assert_weights(forced, state)


def test_openai_torchscript_archive_gets_quickgelu(tiny, tmp_path):
    # OpenAI publishes CLIP as TorchScript (the files clip.load caches and the official
    # CLIP-LoRA code loads); open_clip's own loader cannot read them (weights_only=True).
    _, name, state = tiny
    holder = open_clip.create_model(name, pretrained=None, force_quick_gelu=True)
    holder.load_state_dict(state)
    path = tmp_path / "ViT-tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, OpenAI's files are not
        torch.jit.script(holder.half()).save(str(path))
        model = create_model(name, pretrained=str(path), lora=None)[0]
    assert _activations(model) == {QuickGELU}
    _assert_weights(model, state)


def test_open_clip_checkpoints_are_not_taken_for_openai(tiny, tmp_path):
    # open_clip's (and LAION's) files have OpenAI's key names but no JIT entries: they keep
    # the config's activation (GELU here) instead of a guess.
    _, name, state = tiny
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    safetensors.torch.save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    for file in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors"):
        assert resolve_weights(name, str(tmp_path / file)).activation is None
        model = create_model(name, pretrained=str(tmp_path / file), lora=None)[0]
        assert _activations(model) == {torch.nn.GELU}, file
        _assert_weights(model, state)


def test_hugging_face_cache_folders_name_their_tag(tmp_path):
    # open_clip's download of a tag lands in the Hugging Face cache folder of the tag's
    # repository; a file there gets that tag's activation.
    folders = {
        "models--timm--vit_base_patch16_clip_224.openai": "quickgelu",
        "models--laion--CLIP-ViT-B-16-laion2B-s34B-b88K": "gelu",
        "elsewhere": None,
    }
    for folder, activation in folders.items():
        path = tmp_path / folder / "snapshots" / "0123abc" / "open_clip_model.safetensors"
        path.parent.mkdir(parents=True)
        safetensors.torch.save_file({"logit_scale": torch.ones(())}, str(path))
        assert resolve_weights("ViT-B-16", str(path)).activation == activation, folder


@pytest.fixture
def fake_download(monkeypatch, tmp_path):
    """open_clip's download replaced by a cached file; the weights load is recorded, not done."""
    cached, loaded = str(tmp_path / "open_clip_model.safetensors"), []
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", lambda cfg, *a, **k: cached)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, *a, **k: cached)
    monkeypatch.setattr(open_clip.factory, "load_checkpoint", lambda model, path, **k: loaded.append(path))
    return cached, loaded


def test_openai_tag_is_the_default_and_builds_quickgelu(fake_download):
    cached, loaded = fake_download
    model = create_model("ViT-B-16", lora=None)[0]  # pretrained="openai" by default
    assert loaded == [cached]
    assert _activations(model) == {QuickGELU} and len(model.visual.transformer.resblocks) == 12
    # Known-wrong combinations are refused before anything is built.
    with pytest.raises(ValueError, match="'openai' weights for ViT-B-16 were trained with quickgelu, but activation="):
        create_model("ViT-B-16", "openai", lora=None, activation="gelu")
    with pytest.raises(ValueError, match="'laion2b_s34b_b88k' weights .* with gelu, but activation='quickgelu'"):
        create_model("ViT-B-16", "laion2b_s34b_b88k", lora=None, activation="quickgelu")
    assert loaded == [cached]


def test_openai_is_the_default_of_train_eval_and_reproduce():
    parser = build_parser()
    for argv in (["train", "--dataset", "dtd", "--root", "x"], ["eval"], ["reproduce", "--root", "x"]):
        args = parser.parse_args(argv)
        assert (args.pretrained, args.activation, args.allow_activation_mismatch) == ("openai", "auto", False), argv
        assert parser.parse_args([*argv, "--pretrained", "none"]).pretrained is None
    assert parser.parse_args(["demo"]).pretrained is None  # the demo's toy model has no weights
    assert TrainConfig(dataset="dtd", root="/data", output="/runs").pretrained == "openai"


def test_missing_weights_never_fall_back_to_random(monkeypatch, tmp_path):
    def offline(cfg, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", offline)
    with pytest.raises(FileNotFoundError, match="'openai' weights for ViT-B-16 are not in the cache"):
        create_model("ViT-B-16", lora=None)
    with pytest.raises(ValueError, match="neither a file nor an open_clip tag for ViT-B-16 .*openai"):
        create_model("ViT-B-16", str(tmp_path / "no-such.pt"), lora=None)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt cannot be read as a checkpoint"):
        create_model("ViT-B-16", str(tmp_path / "garbage.pt"), lora=None)


def test_cli_defaults_to_openai_and_fails_in_one_line_offline(tiny, tmp_path, monkeypatch, capsys):
    # train (in a fresh process: really offline, empty cache), eval and reproduce.
    root = tmp_path / "data"
    make_synthetic(str(root), num_classes=3, train_per_class=2, val_per_class=1, test_per_class=2, image_size=16)
    out = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens there, should anything try
    }
    cmd = [sys.executable, "-m", "clip_lora.cli", "train", "--dataset", "synthetic", "--root", str(root)]
    proc = subprocess.run([*cmd, "--output", str(out)], env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("clip-lora train: error: the 'openai' weights for ViT-B-16 are not in the cache")
    assert "--pretrained /path/to/ViT-B-16.pt" in lines[0] and "--pretrained none" in lines[0]
    assert not out.exists()  # failed before writing anything

    def offline(cfg, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", offline)
    for argv in (
        ["eval", "--dataset", "synthetic", "--root", str(root)],
        ["reproduce", "--root", str(root), "--datasets", "synthetic", "--shots", "1", "--seeds", "1",
         "--output", str(tmp_path / "repro")],
    ):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"clip-lora {argv[0]}: error: the 'openai' weights" in err[0], err
    assert not (tmp_path / "repro" / "synthetic").exists()


def test_activation_is_recorded_and_checked(tiny, tmp_path):
    config, name, state = tiny
    openai_file = tmp_path / "openai.pt"
    torch.save(_openai_state_dict(state), openai_file)
    root = tmp_path / "data"
    make_synthetic(str(root), num_classes=3, train_per_class=4, val_per_class=1, test_per_class=2, image_size=16)
    run = tmp_path / "run"
    cfg = TrainConfig(
        dataset="synthetic",
        root=str(root),
        output=str(run),
        shots=2,
        model=config,
        pretrained=str(openai_file),
        lr=1e-2,
        iterations=2,
        fused=False,
        num_workers=0,
        checkpoint_every=0,
        zero_shot=False,
        progress=False,
    )
    metrics = train(cfg)
    assert metrics["activation"] == "quickgelu"
    assert json.loads((run / "metrics.json").read_text())["activation"] == "quickgelu"
    _, info = read_adapter(run / "adapter.safetensors")
    assert info["activation"] == "quickgelu"
    # The adapter does not go into a model built with the other activation.
    gelu = create_model(name, pretrained=None, lora=None)[0]
    with pytest.raises(ValueError, match="trained with quickgelu MLPs, this model has gelu"):
        load_adapter(gelu, run / "adapter.safetensors")
    quick = create_model(name, pretrained=str(openai_file), lora=None)[0]
    load_adapter(quick, run / "adapter.safetensors")
