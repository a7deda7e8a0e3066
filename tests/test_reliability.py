"""Faults and bad input: nothing lost, nothing half-done (issue 10).

Divergence stops a run without writing a non-finite result; a failed load leaves the
model exactly as it was; an adapter for another architecture is refused; one process
writes a run folder; every bad file ends in one line that names it.  Training here uses
a 1-layer CLIP at 32 px with a 16-token context so that each run takes a few seconds.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import safetensors
import safetensors.torch
import torch
from clip_models import randomize_adapters, tiny_clip

import clip_lora.train as train_mod
from clip_lora import LoRAConfig, load_adapter, load_base_state_dict, patch_fused, patch_reference, save_adapter
from clip_lora.cli import main
from clip_lora.data import DatasetError, make_synthetic
from clip_lora.errors import (
    AdapterFileError,
    CheckpointError,
    DivergenceError,
    ModelMismatchError,
    PretrainedError,
    RunLockedError,
)
from clip_lora.train import ADAPTER_FILE, CHECKPOINT_FILE, METRICS_FILE, TrainConfig, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# The same towers with another patch size: every adapter tensor has the same shape.
TINY_PATCH8 = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "patch_size": 8}}


@pytest.fixture(autouse=True)
def _quiet_open_clip():
    logging.disable(logging.WARNING)  # "model initialized randomly"
    yield
    logging.disable(logging.NOTSET)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("reliability")
    make_synthetic(
        str(base / "data"), num_classes=3, train_per_class=4, val_per_class=0, test_per_class=2, image_size=32
    )
    (base / "rel-tiny.json").write_text(json.dumps(TINY))
    (base / "rel-tiny-p8.json").write_text(json.dumps(TINY_PATCH8))
    return base


def _config(setup, out, **over) -> TrainConfig:
    kw = dict(
        dataset="synthetic",
        root=str(setup / "data"),
        output=str(setup / out),
        shots=4,
        model=str(setup / "rel-tiny.json"),
        pretrained=None,
        lr=1e-2,
        batch_size=12,
        iterations=2,
        fused=False,
        num_workers=0,
        checkpoint_every=0,
        zero_shot=False,
        progress=False,
    )
    kw.update(over)
    return TrainConfig(**kw)


def _train_args(setup, out, *extra) -> list[str]:
    return [
        "train", "--dataset", "synthetic", "--root", str(setup / "data"), "--shots", "4",
        "--model", str(setup / "rel-tiny.json"), "--pretrained", "none", "--lr", "1e-2", "--batch-size", "12",
        "--iterations", "2", "--no-fused", "--workers", "0", "--checkpoint-every", "0", "--no-progress",
        "--no-zero-shot", "--output", str(out), *extra,
    ]  # fmt: skip


def _eval_args(setup, *extra, model="rel-tiny.json") -> list[str]:
    return [
        "eval", "--dataset", "synthetic", "--root", str(setup / "data"), "--model", str(setup / model),
        "--pretrained", "none", "--no-fused", "--workers", "0", *extra,
    ]  # fmt: skip


def _one_line_error(capsys, *needles: str) -> str:
    """The CLI's stderr must end in exactly one error line that names ``needles``."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _tiny_model(setup, config="rel-tiny.json", lora: LoRAConfig | None = None):
    model, _, _ = train_mod.build_model(
        _config(setup, "unused", model=str(setup / config), lora=lora or LoRAConfig()), torch.device("cpu")
    )
    return model


# =============================================================================
# 1. Divergence
# =============================================================================


def test_divergence_watch_tolerates_scaler_skips_only():
    nan = float("nan")
    DivergenceWatch = train_mod.DivergenceWatch
    strict = DivergenceWatch(patience=0)
    assert strict.update([1.0, 0.9], first=1) is None
    assert strict.update([0.8, nan, 0.7], first=3) == 4  # no scaler: the first NaN is divergence
    scaled = DivergenceWatch(patience=3)
    # fp16 + GradScaler: a few skipped steps (inf/NaN, then finite again) are normal.
    assert scaled.update([1.0, nan, nan, nan, 0.9, math.inf, 0.8], first=1) is None
    # A loss that stays non-finite beyond the scaler's recovery is divergence, reported where it began.
    assert scaled.update([0.7, nan, nan], first=8) is None
    assert scaled.update([nan, nan], first=11) == 9
    assert train_mod.SCALER_PATIENCE > 16  # more than the halvings from 65536 to 1


def test_too_high_lr_diverges_keeps_last_finite_checkpoint(setup, capsys):
    # The issue's `--lr 10` reached NaN under fp16 autocast, whose range ends at 65504.  In
    # fp32 on CPU these tiny models stay finite at lr 10 (tried: 48 iterations), so the
    # same failure is provoked with a larger step: NaN at iteration 9, checkpoints every 2.
    out = setup / "high_lr"
    args = _train_args(setup, out, "--lr", "1000", "--iterations", "30", "--checkpoint-every", "2")
    assert main(args) == 2
    line = _one_line_error(capsys, "diverged at iteration", "--lr", "bf16", str(out / CHECKPOINT_FILE))
    at = int(line.split("diverged at iteration ")[1].split("/")[0])
    assert not os.path.exists(out / ADAPTER_FILE) and not os.path.exists(out / METRICS_FILE)
    ckpt = torch.load(out / CHECKPOINT_FILE, weights_only=True)
    assert at - 2 <= ckpt["iteration"] < at  # the last checkpoint before the NaN, none after it
    assert all(torch.isfinite(t).all() for t in ckpt["trainable"].values())
    assert all(math.isfinite(v) for v in ckpt["losses"])


def test_nan_images_diverge_at_the_first_iteration(setup, monkeypatch):
    real = train_mod.train_transform

    def nan_transform(*args, **kwargs):
        inner = real(*args, **kwargs)
        return lambda image: inner(image) * float("nan")

    monkeypatch.setattr(train_mod, "train_transform", nan_transform)
    cfg = _config(setup, "nan_images", iterations=3)
    with pytest.raises(DivergenceError, match=r"diverged at iteration 1/3: the loss is nan"):
        train(cfg)
    assert not os.path.exists(os.path.join(cfg.output, ADAPTER_FILE))
    assert not os.path.exists(os.path.join(cfg.output, METRICS_FILE))


def test_nan_pretrained_is_refused(setup, capsys):
    import open_clip

    from clip_lora.train import register_model_config

    model = open_clip.create_model(register_model_config(str(setup / "rel-tiny.json")), pretrained=None)
    state = model.state_dict()
    state["visual.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = setup / "nan_weights.pt"
    torch.save(state, path)
    assert main(_train_args(setup, setup / "nan_pretrained", "--pretrained", str(path))) == 2
    _one_line_error(capsys, str(path), "non-finite", "visual.conv1.weight")


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_logit_scale_must_be_finite_and_positive(setup, value):
    with pytest.raises(ValueError, match="logit_scale must be a finite number > 0"):
        _config(setup, "x", logit_scale=float(value))
    with pytest.raises(SystemExit) as e:
        main(_train_args(setup, setup / "x", "--logit-scale", value))
    assert e.value.code == 2


def test_eval_refuses_a_non_finite_adapter(setup, tmp_path, capsys):
    model = _tiny_model(setup)
    randomize_adapters(model)
    path = tmp_path / "nan.safetensors"
    save_adapter(model, path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = sorted(tensors)[-1]
    tensors[key][0, 0] = float("nan")
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    assert main(_eval_args(setup, "--adapter", str(path))) == 2
    _one_line_error(capsys, str(path), key, "non-finite")
    with pytest.raises(ValueError, match="non-finite"):
        save_adapter(_nan_model(setup), tmp_path / "never.safetensors")
    assert not any(p.name.startswith(("never", ".never")) for p in tmp_path.iterdir())


def _nan_model(setup):
    from clip_lora import lora_parameters

    model = _tiny_model(setup)
    with torch.no_grad():
        lora_parameters(model)[0][0, 0] = float("nan")
    return model


# =============================================================================
# 2. A failed load changes nothing
# =============================================================================


def _snapshot(model):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        getattr(model, "clip_lora_config", None),
    )


def _assert_unchanged(model, snap):
    modules, state, grads, config = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k  # bitwise: no NaN in these models
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert getattr(model, "clip_lora_config", None) == config


@pytest.fixture()
def base():
    return tiny_clip(custom=False, depth=4)


def _bad_adapter_file(base, path, how):
    model = patch_fused(copy.deepcopy(base))
    randomize_adapters(model)
    save_adapter(model, path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    last = sorted(tensors)[-1]  # sorted last: every other tensor would be copied first by a naive loader
    if how == "shape":
        tensors[last] = tensors[last][:, :1].contiguous()
    elif how == "dtype":
        tensors[last] = tensors[last].to(torch.int32)
    elif how == "nan":
        tensors[last][0, 0] = float("nan")
    elif how == "missing":
        del tensors[last]
    safetensors.torch.save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("how", ["shape", "dtype", "nan", "missing"])
@pytest.mark.parametrize("patched", [True, False])
def test_failed_adapter_load_changes_nothing(base, tmp_path, how, patched):
    path = tmp_path / "bad.safetensors"
    _bad_adapter_file(base, path, how)
    model = copy.deepcopy(base)
    if patched:
        patch_fused(model)
        randomize_adapters(model, seed=5)
    snap = _snapshot(model)
    with pytest.raises(AdapterFileError, match=str(path)):
        load_adapter(model, path)
    _assert_unchanged(model, snap)


def test_a_config_that_does_not_fit_leaves_an_unpatched_model_alone(base, tmp_path):
    path = tmp_path / "deep.safetensors"
    save_adapter(patch_fused(tiny_clip(custom=False, depth=4)), path)
    model = tiny_clip(custom=False, depth=4)
    # A hand-edited config naming a block this model lacks: fails after reading the config.
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["clip_lora"])
    info["config"]["position"] = [7]
    safetensors.torch.save_file(tensors, str(path), metadata={"clip_lora": json.dumps(info)})
    snap = _snapshot(model)
    with pytest.raises(AdapterFileError):
        load_adapter(model, path)
    _assert_unchanged(model, snap)


def _official(path, depth=4, width=64, r=2, params=("q", "v"), **meta):
    g = torch.Generator().manual_seed(1)
    proj = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "proj"}
    weights = {
        f"layer_{i}": {
            proj[p]: {"w_lora_A": torch.randn(r, width, generator=g), "w_lora_B": torch.randn(width, r, generator=g)}
            for p in params
        }
        for i in range(depth)
    }
    metadata = {"r": r, "alpha": 1, "encoder": "vision", "params": list(params), "position": "all", **meta}
    torch.save({"weights": weights, "metadata": metadata}, path)
    return weights, metadata


@pytest.mark.parametrize("fault", ["shape", "renamed", "nan", "missing_proj"])
@pytest.mark.parametrize("patched", [True, False])
def test_failed_official_import_changes_nothing(base, tmp_path, fault, patched):
    path = tmp_path / "official.pt"
    weights, meta = _official(path)
    last = weights["layer_3"]
    if fault == "shape":
        last["v_proj"]["w_lora_B"] = last["v_proj"]["w_lora_B"][:-1]
    elif fault == "renamed":
        weights["layer_x"] = weights.pop("layer_3")
    elif fault == "nan":
        last["v_proj"]["w_lora_A"][0, 0] = float("nan")
    else:
        del last["v_proj"]
    torch.save({"weights": weights, "metadata": meta}, path)
    model = copy.deepcopy(base)
    if patched:
        patch_reference(model, LoRAConfig(encoder="vision", params=("q", "v")))
        randomize_adapters(model, seed=5)
    snap = _snapshot(model)
    with pytest.raises(AdapterFileError, match="layer_3" if fault != "nan" else "non-finite"):
        load_adapter(model, path)
    _assert_unchanged(model, snap)
    # The intact file loads.
    _official(path)
    load_adapter(model, path)
    assert model.clip_lora_config.encoder == "vision"


@pytest.mark.parametrize("fault", ["unexpected", "missing", "shape", "nan"])
def test_failed_base_state_dict_load_changes_nothing(base, fault):
    source = tiny_clip(custom=False, depth=4, seed=7).state_dict()
    model = patch_fused(copy.deepcopy(base))
    randomize_adapters(model)
    last = sorted(source)[-1]
    if fault == "unexpected":
        source["not.a.key"] = torch.zeros(1)
    elif fault == "missing":
        del source[last]
    elif fault == "shape":
        source[last] = source[last][..., :1]
    else:
        source[last] = source[last].clone()
        source[last].view(-1)[0] = float("nan")
    snap = _snapshot(model)
    with pytest.raises(ValueError):
        load_base_state_dict(model, source)
    _assert_unchanged(model, snap)


# =============================================================================
# 3. An adapter for another model is refused
# =============================================================================


def test_adapter_for_another_architecture_is_refused(setup, tmp_path):
    import open_clip

    from clip_lora.train import register_model_config

    def plain(config):  # built by open_clip directly, as in the README: no recorded model name
        torch.manual_seed(0)
        return open_clip.create_model(register_model_config(str(setup / config)), pretrained=None)

    source = patch_reference(plain("rel-tiny.json"))
    randomize_adapters(source)
    path = tmp_path / "p16.safetensors"
    save_adapter(source, path)
    other = plain("rel-tiny-p8.json")
    snap = _snapshot(other)
    with pytest.raises(ModelMismatchError, match=r"patch 16x16.*this model is .*patch 8x8.*check_model=False"):
        load_adapter(other, path, fused=False)
    _assert_unchanged(other, snap)
    info = json.loads(safetensors.safe_open(str(path), framework="pt").metadata()["clip_lora"])
    assert info["signature"]["vision"]["patch_size"] == [16, 16]
    assert info["signature"]["text"]["context_length"] == 16 and info["signature"]["text"]["vocab_size"] == 49408
    load_adapter(other, path, fused=False, check_model=False)  # the explicit override
    for k, v in safetensors.torch.load_file(str(path)).items():
        assert torch.equal(other.state_dict()[k], v)

    # A file written before signatures existed still loads (checked on tower depth and width only).
    with safetensors.safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del info["signature"]
    old = tmp_path / "old.safetensors"
    safetensors.torch.save_file(tensors, str(old), metadata={"clip_lora": json.dumps(info)})
    load_adapter(plain("rel-tiny.json"), old, fused=False)


# =============================================================================
# 4. One run folder, one writer
# =============================================================================


def _hold_lock(folder) -> subprocess.Popen:
    """Another process that holds the run folder's lock, as a running `clip-lora train` does."""
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(folder / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(300)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_and_a_dead_holders_lock_does_not_block(setup, capsys):
    out = setup / "locked"
    out.mkdir()
    holder = _hold_lock(out)
    try:
        assert main(_train_args(setup, out)) == 2
        _one_line_error(capsys, str(out), f"pid {holder.pid}")
        assert not os.path.exists(out / "config.json")  # nothing written by the refused process
        with pytest.raises(RunLockedError):
            train(_config(setup, "locked"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died without cleaning up: its lock file (with its pid) stays, the lock does not.
    assert (out / ".lock").read_text().strip() == str(holder.pid)
    assert main(_train_args(setup, out)) == 0
    assert os.path.isfile(out / METRICS_FILE)


def test_finished_run_is_not_retrained_unless_forced(setup, capsys):
    out = setup / "finished"
    assert main(_train_args(setup, out)) == 0
    capsys.readouterr()
    stamp = os.stat(out / METRICS_FILE).st_mtime_ns
    accuracy = json.loads((out / METRICS_FILE).read_text())["accuracy"]
    # Temp files of writes killed between write and rename: removed at the next start.
    stray = [out / "checkpoint.pt.tmp4242", out / ".adapter.safetensors.4242.abcd1234.tmp", out / "config.json.tmp7"]
    for p in stray:
        p.write_bytes(b"partial")

    t0 = time.perf_counter()
    assert main(_train_args(setup, out)) == 0
    assert "already finished" in capsys.readouterr().out
    assert os.stat(out / METRICS_FILE).st_mtime_ns == stamp and time.perf_counter() - t0 < 10
    assert not any(p.exists() for p in stray)
    again = train(_config(setup, "finished"))
    assert again["already_finished"] and again["accuracy"] == accuracy

    # Another configuration in a finished folder is an error, not a silent skip.
    assert main([*_train_args(setup, out), "--lr", "5e-3"]) == 2
    _one_line_error(capsys, str(out), "--force")

    assert main([*_train_args(setup, out), "--force"]) == 0
    assert os.stat(out / METRICS_FILE).st_mtime_ns != stamp
    assert "already finished" not in capsys.readouterr().out


# =============================================================================
# 5. Every bad file gets one line, naming the file
# =============================================================================


def _write(path, content: bytes):
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("kind", ["corrupt", "random", "empty", "directory", "missing", "bad_json", "pt_no_params"])
def test_bad_adapter_files_are_one_line(setup, tmp_path, capsys, kind):
    good = tmp_path / "good.safetensors"
    model = _tiny_model(setup)
    save_adapter(model, good)
    data = good.read_bytes()
    if kind == "corrupt":
        path = _write(tmp_path / "a.safetensors", data[: len(data) // 2])
    elif kind == "random":
        path = _write(tmp_path / "a.safetensors", os.urandom(4096))
    elif kind == "empty":
        path = _write(tmp_path / "a.safetensors", b"")
    elif kind == "directory":
        path = tmp_path / "adir"
        path.mkdir()
    elif kind == "missing":
        path = tmp_path / "nowhere.safetensors"
    elif kind == "bad_json":
        with safetensors.safe_open(str(good), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        path = tmp_path / "a.safetensors"
        safetensors.torch.save_file(tensors, str(path), metadata={"clip_lora": '{"format_version": 1, "config": '})
    else:
        path = tmp_path / "a.pt"
        _official(path, depth=1, width=32)
        saved = torch.load(path, weights_only=True)
        del saved["metadata"]["params"]
        torch.save(saved, path)
    assert main(_eval_args(setup, "--adapter", str(path))) == 2
    line = _one_line_error(capsys, str(path))
    assert "weights_only" not in line
    if kind == "pt_no_params":
        assert "'params'" in line


@pytest.mark.parametrize("kind", ["garbage", "missing", "architecture", "keys"])
def test_bad_pretrained_is_one_line(setup, tmp_path, capsys, kind):
    import open_clip

    from clip_lora.train import register_model_config

    path = tmp_path / "weights.pt"
    if kind == "garbage":
        path.write_bytes(os.urandom(2048))
    elif kind == "architecture":
        torch.save(open_clip.create_model(register_model_config(str(setup / "rel-tiny-p8.json"))).state_dict(), path)
    elif kind == "keys":
        state = open_clip.create_model(register_model_config(str(setup / "rel-tiny.json"))).state_dict()
        state["visual.conv_one.weight"] = state.pop("visual.conv1.weight")
        torch.save(state, path)
    assert main(_eval_args(setup, "--pretrained", str(path))) == 2
    _one_line_error(capsys, str(path))
    with pytest.raises(PretrainedError, match=str(path)):
        train_mod.build_model(_config(setup, "x", pretrained=str(path)), torch.device("cpu"))


@pytest.mark.parametrize("kind", ["truncated", "empty"])
def test_bad_checkpoint_is_one_line(setup, capsys, kind):
    out = setup / f"ckpt_{kind}"
    assert train(_config(setup, out.name, iterations=3), stop_after=1)["interrupted"]
    ckpt = out / CHECKPOINT_FILE
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"")
    assert main(_train_args(setup, out, "--iterations", "3")) == 2
    _one_line_error(capsys, str(ckpt), "delete it")
    with pytest.raises(CheckpointError):
        train(_config(setup, out.name, iterations=3))


def test_debug_shows_the_traceback(setup, tmp_path):
    with pytest.raises(AdapterFileError):
        main(["--debug", *_eval_args(setup, "--adapter", str(tmp_path / "missing.safetensors"))])


# =============================================================================
# 6. Safety and data
# =============================================================================


class _Touch:
    """A pickled object that runs code when unpickled without ``weights_only``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_checkpoint_with_code_is_refused_not_run(setup, capsys):
    out = setup / "malicious"
    assert train(_config(setup, out.name, iterations=3), stop_after=1)["interrupted"]
    ckpt = torch.load(out / CHECKPOINT_FILE, weights_only=True)
    marker = setup / "code_ran"
    ckpt["zero_shot"] = _Touch(marker)
    torch.save(ckpt, out / CHECKPOINT_FILE)
    assert main(_train_args(setup, out, "--iterations", "3")) == 2
    assert not marker.exists()
    _one_line_error(capsys, str(out / CHECKPOINT_FILE), "delete it")


def test_checkpoint_loads_with_weights_only_and_resume_matches(setup):
    ref = train(_config(setup, "wo_ref", iterations=3, lora=LoRAConfig(dropout=0.25)))
    cfg = _config(setup, "wo_resumed", iterations=3, lora=LoRAConfig(dropout=0.25))
    train(cfg, stop_after=1)
    ckpt = torch.load(os.path.join(cfg.output, CHECKPOINT_FILE), weights_only=True)
    assert isinstance(ckpt["rng"][0]["python"], torch.Tensor)
    torch.manual_seed(99)
    resumed = train(cfg)
    assert resumed["loss_curve"] == ref["loss_curve"]
    a = safetensors.torch.load_file(os.path.join(cfg.output, ADAPTER_FILE))
    b = safetensors.torch.load_file(str(setup / "wo_ref" / ADAPTER_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if a model gets built: data problems must be found before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the data problem was found")

    monkeypatch.setattr(train_mod, "build_model", refuse)


def test_empty_class_folder_is_refused_before_the_model(tmp_path, setup, no_model):
    for c, n in (("cat", 2), ("dog", 0)):
        for split in ("train", "test"):
            folder = tmp_path / "ds" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                shutil.copy(
                    setup / "data" / "synthetic" / "images" / "red_circle" / "train_0000.png", folder / f"{i}.png"
                )
    (tmp_path / "ds" / "train" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=r"class 'dog'.*no image files"):
        train(_config(setup, "empty_class", dataset="folder", root=str(tmp_path / "ds"), shots=1))


def test_fewer_images_than_shots_warns(setup):
    with pytest.warns(UserWarning, match=r"4 training images, fewer than --shots 5.*repeats"):
        train(_config(setup, "few", shots=5, iterations=1))


@pytest.mark.parametrize("fault", ["corrupt", "missing"])
def test_bad_test_image_is_found_before_the_model(setup, tmp_path, no_model, fault):
    root = tmp_path / "data"
    shutil.copytree(setup / "data", root)
    split = json.loads((root / "synthetic" / "split_zhou_Synthetic.json").read_text())
    victim = root / "synthetic" / "images" / split["test"][-1][0]
    if fault == "corrupt":
        victim.write_bytes(b"not a png")
    else:
        victim.unlink()
    with pytest.raises(DatasetError, match=str(victim)):
        train(_config(setup, f"bad_test_{fault}", root=str(root)))


def test_adapter_is_saved_before_the_final_evaluation(setup, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk went away during the final evaluation")

    monkeypatch.setattr(train_mod, "evaluate", broken)
    cfg = _config(setup, "eval_fails")
    with pytest.raises(OSError):
        train(cfg)
    assert os.path.isfile(os.path.join(cfg.output, ADAPTER_FILE))


def test_image_size_zero_is_rejected(setup):
    with pytest.raises(ValueError, match="image_size must be a positive"):
        _config(setup, "x", image_size=0)
    with pytest.raises(SystemExit) as e:
        main(_train_args(setup, setup / "x", "--image-size", "0"))
    assert e.value.code == 2


def test_adapter_file_mode_follows_the_umask(setup, tmp_path):
    old = os.umask(0o022)
    try:
        save_adapter(_tiny_model(setup), tmp_path / "a.safetensors")
        (tmp_path / "other.json").write_text("{}")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.safetensors").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "other.json").st_mode & 0o777 == 0o644
