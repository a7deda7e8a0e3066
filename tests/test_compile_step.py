"""``--compile``: the compiled towers give the eager step's loss and LoRA gradients.

The default suite traces with ``backend="aot_eager"``: Dynamo with ``fullgraph=True``
and AOTAutograd's forward and backward graphs, the very graphs Inductor receives, but
without Inductor's C++ code generation (minutes on this CPU).  The Inductor runs, the
product's CPU path, are under ``-m slow``.
"""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch
from clip_models import randomize_adapters, tiny_clip, tiny_tokens

import clip_lora.train as train_mod
from clip_lora import LoRAConfig, lora_parameters, patch_fused
from clip_lora.cli import build_parser
from clip_lora.train import CHECKPOINT_FILE, TrainConfig, _loss_sum, compiled_towers, train, train_step

CLASSES = 5
BATCHES = (3, 3, 2)  # the last batch is short: one more graph (dynamic=False)


def _steps(compiled: bool, p: float, backend="aot_eager") -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Three train_steps of a tiny patched CLIP; (loss, LoRA gradients) after each."""
    model = tiny_clip(custom=False, depth=1)
    patch_fused(model, LoRAConfig(r=2, dropout=p))
    randomize_adapters(model)
    model.train()
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    tokens = tiny_tokens(CLASSES)
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (n,), generator=g)) for n in BATCHES]

    def loss_fn(images, labels):
        return _loss_sum(
            model, images, labels, tokens=tokens, fixed_text=None, num_classes=CLASSES, train_vision=True,
            precision="fp32", logit_scale=100.0, rank=0, world=1,
        )  # fmt: skip

    keys = set(model.state_dict())
    torch.manual_seed(0)  # the dropout seeds
    out = []
    towers = compiled_towers(model, torch.device("cpu"), backend=backend) if compiled else contextlib.nullcontext()
    with towers:
        for images, labels in batches:
            loss = train_step(
                loss_fn, images, labels, global_batch=len(images), params=params, optimizer=optimizer,
                scheduler=scheduler, scaler=scaler,
            )  # fmt: skip
            out.append((loss, [q.grad.clone() for q in params]))
            assert set(model.state_dict()) == keys  # no _orig_mod. wrapper, even inside the block
    assert not any("forward" in vars(m) for m in model.modules())  # eager again after the block
    return out


def _assert_same(eager, compiled, rtol, atol):
    for (loss_e, grads_e), (loss_c, grads_c) in zip(eager, compiled, strict=True):
        torch.testing.assert_close(loss_c, loss_e, rtol=rtol, atol=atol)
        for ge, gc in zip(grads_e, grads_c, strict=True):
            assert ge.abs().max() > 0  # every adapter gets a gradient: a real comparison
            torch.testing.assert_close(gc, ge, rtol=rtol, atol=atol * ge.abs().max().item())


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_compiled_step_matches_eager(p):
    from torch._dynamo.testing import CompileCounterWithBackend

    eager = _steps(False, p)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = _steps(True, p, counter)
    # The text stack once, the vision tower for the full and for the short batch: three
    # whole graphs (fullgraph=True turns any graph break into an error).
    assert counter.frame_count == 3
    _assert_same(eager, compiled, rtol=1e-5, atol=1e-6)
    if p:
        # Dropout acted (other losses than without it), and compiled it drew the same masks.
        no_dropout = _steps(False, 0.0)
        assert not torch.equal(no_dropout[0][0], eager[0][0])


@pytest.mark.slow
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_inductor_step_matches_eager(p):
    eager = _steps(False, p, "inductor")
    compiled = _steps(True, p, "inductor")
    # Inductor fuses and reorders fp32 reductions: rounding-level differences.
    _assert_same(eager, compiled, rtol=1e-4, atol=1e-5)


def test_compile_flag_and_config():
    args = build_parser().parse_args(["train", "--dataset", "synthetic", "--root", "/data", "--compile"])
    assert args.compile is True
    assert build_parser().parse_args(["train", "--dataset", "synthetic", "--root", "/data"]).compile is False
    assert TrainConfig(dataset="dtd", root="/d", output="/o").compile is False
    assert TrainConfig(dataset="dtd", root="/d", output="/o", compile=True).recipe()["compile"] is True
    with pytest.raises(TypeError, match="compile must be True or False"):
        TrainConfig(dataset="dtd", root="/d", output="/o", compile="yes")


# --------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from clip_lora.cli import DEMO_MODEL_CONFIG
    from clip_lora.data import make_synthetic

    base = tmp_path_factory.mktemp("compile")
    make_synthetic(str(base / "data"), num_classes=4, train_per_class=4, test_per_class=3, image_size=32)
    (base / "tiny.json").write_text(json.dumps(DEMO_MODEL_CONFIG))
    return base


def _config(base, out: str, **over) -> TrainConfig:
    kw = dict(
        dataset="synthetic", root=str(base / "data"), output=str(base / out), shots=4, seed=1,
        model=str(base / "tiny.json"), pretrained=None, lr=1e-2, batch_size=12, iterations=4,
        fused=True, num_workers=0, checkpoint_every=0, zero_shot=False, progress=False,
    )  # fmt: skip
    kw.update(over)
    return TrainConfig(**kw)


def _adapter(run: str) -> dict[str, torch.Tensor]:
    import safetensors.torch

    return safetensors.torch.load_file(os.path.join(run, train_mod.ADAPTER_FILE))


def _interrupted_and_resumed(data, out: str) -> dict:
    cfg = _config(data, out, compile=True)
    # Batches of 12 then 4 (16 images): the short batch comes before and after the interruption.
    assert train(cfg, stop_after=2) == {"interrupted": True, "iteration": 2}
    ckpt = torch.load(os.path.join(cfg.output, CHECKPOINT_FILE), weights_only=True)
    assert ckpt["recipe"]["compile"] is True
    assert not any("_orig_mod" in k for k in ckpt["trainable"])
    assert ckpt["trainable"] and all(".lora_" in k for k in ckpt["trainable"])
    torch.manual_seed(12345)  # a restarted job starts from an unrelated RNG state
    m = train(cfg)
    assert m["compile"] is True and len(m["loss_curve"]) == 4
    assert json.load(open(os.path.join(cfg.output, "config.json")))["compile"] is True
    log = open(os.path.join(cfg.output, "train.log")).read()
    assert "towers compiled" in log and "torch.compile: visual, transformer" in log
    return m


def test_compiled_run_resumes_like_an_eager_run(data, monkeypatch):
    eager = train(_config(data, "eager"))
    assert eager["compile"] is False
    # aot_eager instead of Inductor: the same captured graphs, without minutes of C++ builds.
    real = compiled_towers
    monkeypatch.setattr(train_mod, "compiled_towers", lambda m, d: real(m, d, backend="aot_eager"))
    m = _interrupted_and_resumed(data, "compiled")
    torch.testing.assert_close(m["loss_curve"], eager["loss_curve"], rtol=1e-5, atol=1e-6)
    got, want = _adapter(str(data / "compiled")), _adapter(str(data / "eager"))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_resume_refuses_another_compile_setting(data):
    cfg = _config(data, "switch")
    assert train(cfg, stop_after=1)["interrupted"]
    with pytest.raises(ValueError, match=r"differs in \['compile'\]"):
        train(_config(data, "switch", compile=True))
    # A checkpoint written before --compile existed resumes as an eager run.
    path = os.path.join(cfg.output, CHECKPOINT_FILE)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["recipe"]["compile"]
    torch.save(ckpt, path)
    assert train(cfg)["compile"] is False


@pytest.mark.slow
def test_inductor_run_resumes_like_an_eager_run(data):
    eager = train(_config(data, "eager-slow"))
    m = _interrupted_and_resumed(data, "inductor")
    torch.testing.assert_close(m["loss_curve"], eager["loss_curve"], rtol=1e-4, atol=1e-5)
    got, want = _adapter(str(data / "inductor")), _adapter(str(data / "eager-slow"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


def test_compiled_towers_on_a_torch_without_a_per_call_recompile_limit(monkeypatch):
    """torch 2.11 (the GPU machine's) has no ``torch.compile(recompile_limit=...)``: the
    block raises Dynamo's global limit instead, and puts it back on exit."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    before = getattr(dynamo_config, name)
    seen = {}

    def old_compile(fn, *, fullgraph=False, dynamic=None, backend="inductor", mode=None, options=None, disable=False):
        seen["limit"] = getattr(dynamo_config, name)
        return fn

    monkeypatch.setattr(torch, "compile", old_compile)
    model = tiny_clip(custom=False, depth=1)
    with compiled_towers(model, torch.device("cpu"), backend="aot_eager"):
        assert getattr(dynamo_config, name) == max(before, train_mod.COMPILE_RECOMPILE_LIMIT)
    assert seen["limit"] == max(before, train_mod.COMPILE_RECOMPILE_LIMIT)
    assert getattr(dynamo_config, name) == before
