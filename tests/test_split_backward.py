"""The split backward (lora_kernels/split_backward.py: cuBLAS dY·W + two Triton passes)
against the fp64 reference, at every dtype, layout and padded adapter width, on the
hypothesis draws of test_kernel_properties, with NaN placement and at real shapes on a GPU.

It is selected by ``fused_lora.BACKWARD_IMPL``; each test switches it on for its own
calls only (:func:`split_backward`)."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys

import pytest
import torch
from conftest import HAS_CUDA
from hypothesis import given, settings
from kernel_cases import make_case, rel_err, run_fused
from test_kernel_edge_cases import test_nan_lands_where_the_reference_puts_it as nan_lands_where_the_reference_puts_it
from test_kernel_properties import _COMMON, FOUND, TRITON_DRAWS, check
from test_kernels import DTYPES, LAYOUTS, RANKS, assert_close_to_reference

from lora_kernels import fused_lora, split_backward

DEVICE = "cuda" if HAS_CUDA else "cpu"
M, K = 150, 150


@contextlib.contextmanager
def split_backward_on():
    old = fused_lora.BACKWARD_IMPL
    fused_lora.BACKWARD_IMPL = "split"
    try:
        yield
    finally:
        fused_lora.BACKWARD_IMPL = old


def _matrix():
    # Every dtype × layout; rank, bias and dropout cycle so that each meets every dtype.
    ranks = itertools.cycle(RANKS)
    flags = itertools.cycle([(True, 0.25), (False, 0.0), (False, 0.25), (True, 0.0)])
    for dtype, layout in itertools.product(DTYPES, LAYOUTS):
        rank, (bias, p) = next(ranks), next(flags)
        yield pytest.param(dtype, rank, layout, bias, p, id=f"{str(dtype)[6:]}-r{rank}-{layout}-b{int(bias)}-p{p}")


@pytest.mark.parametrize("dtype,rank,layout,bias,p", list(_matrix()))
def test_split_matches_fp64_reference(dtype, rank, layout, bias, p):
    sizes, adapted = LAYOUTS[layout]
    case = make_case(M, K, sizes, rank, adapted, dtype, bias=bias, device=DEVICE, seed=rank + 1)
    with split_backward_on():
        got = run_fused(case, p=p, seed=11, backend="triton")
    assert got[1].dtype == dtype and all(g.dtype == torch.float32 for g in got[2:])
    assert_close_to_reference(case, got, p=p, seed=11, dtype=dtype)


@pytest.mark.parametrize(
    "dtype,rank,sizes,adapted",
    [
        (torch.float32, 64, [33, 40, 67], [True, False, True]),  # SR_PAD 256
        (torch.bfloat16, 40, [67, 67, 67], [True, True, True]),  # SR_PAD 128
        (torch.float16, 16, [201], [True]),  # S·r = 16 on one slot (the Triton 3.6 case)
    ],
    ids=["fp32-sr256", "bf16-sr128", "fp16-r16-one-slot"],
)
def test_split_widest_adapters(dtype, rank, sizes, adapted):
    case = make_case(70, 90, sizes, rank, adapted, dtype, device=DEVICE, seed=4)
    with split_backward_on():
        got = run_fused(case, p=0.25, seed=5, backend="triton")
    assert_close_to_reference(case, got, p=0.25, seed=5, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_agrees_with_the_one_pass_backward(dtype):
    # Same forward, same masks: the two backwards differ only by rounding (dX is rounded
    # once more in the split one: cuBLAS writes dY·W in the input dtype).
    case = make_case(M, K, [67, 67, 67], 2, [True, False, True], dtype, device=DEVICE, seed=9)
    one = run_fused(case, p=0.25, seed=21, backend="triton")
    with split_backward_on():
        split = run_fused(case, p=0.25, seed=21, backend="triton")
    assert torch.equal(one[0], split[0]), "the forward is shared"
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    for a, b in zip(one[1:], split[1:]):
        assert rel_err(b, a) <= tol


@settings(max_examples=8, **_COMMON)
@given(d=TRITON_DRAWS)
def test_split_properties(d):
    # Odd shapes, transposed and sliced layouts, absent slots, fp16/bf16 adapters, int and
    # tensor seeds: test_kernel_properties' checks (reference and applied masks).
    with split_backward_on():
        check(d, "triton")


@pytest.mark.slow
@settings(max_examples=150, **{**_COMMON, "derandomize": False})
@given(d=TRITON_DRAWS)
def test_split_properties_many(d):
    with split_backward_on():
        check(d, "triton")


@pytest.mark.parametrize("name", list(FOUND))
def test_split_found_by_hypothesis(name):
    with split_backward_on():
        check(FOUND[name], "triton")


@pytest.mark.parametrize("where", ["x_dropped", "a_slot1", "b_slot2", "dy_slot0"])
def test_split_nan_lands_where_the_reference_puts_it(where):
    with split_backward_on():
        nan_lands_where_the_reference_puts_it("triton", where)


def test_an_unknown_backward_is_refused():
    old = fused_lora.BACKWARD_IMPL
    case = make_case(9, 12, [5, 7], 2, [True, True], torch.float32, device=DEVICE)
    fused_lora.BACKWARD_IMPL = "splt"
    try:
        with pytest.raises(ValueError, match=r"BACKWARD_IMPL must be one of \('fused', 'split'\), got 'splt'"):
            run_fused(case, p=0.0, seed=0, backend="triton")
    finally:
        fused_lora.BACKWARD_IMPL = old


def test_the_environment_selects_the_backward_at_import():
    code = "from lora_kernels import fused_lora; print(fused_lora.BACKWARD_IMPL)"
    env = {**os.environ, fused_lora.BACKWARD_ENV: "split"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "split"
    # A bad value does not break the import (a CLI must be able to report it in one
    # line); the first Triton backward refuses it, naming the variable and the fix.  The
    # forward runs the kernels: compiled on a GPU, else through the interpreter.
    env[fused_lora.BACKWARD_ENV] = "fast"
    if not HAS_CUDA:
        env["TRITON_INTERPRET"] = "1"
    code += (
        "\nimport torch\nfrom lora_kernels import lora_linear_packed, slot_layout"
        f"\nkw = dict(device={DEVICE!r})"
        "\nx = torch.randn(4, 8, requires_grad=True, **kw); lay = slot_layout(8, [8], 2)"
        "\na = torch.randn(2, 8, requires_grad=True, **kw); b = torch.randn(8, 2, requires_grad=True, **kw)"
        "\nw = torch.randn(8, 8, **kw)"
        "\ny = lora_linear_packed(x, w, lora_a=a, lora_b=b, layout=lay, scale=1.0, backend='triton')"
        "\ny.sum().backward()"
    )
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if "InterpreterVersionError" in bad.stderr:  # triton < 3.7 with numpy >= 2.4 (lora_kernels/_compat.py)
        pytest.skip(bad.stderr.strip().splitlines()[-1])
    assert bad.stdout.startswith("fast")
    assert bad.returncode != 0
    assert "BACKWARD_IMPL must be one of ('fused', 'split'), got 'fast'" in bad.stderr
    assert "set $CLIP_LORA_BACKWARD to fused or split, or unset it" in bad.stderr


def test_every_padded_width_has_a_configuration():
    # The partial rows are shared by both passes: one row tile per (dtype, width).
    for dtype in DTYPES:
        for srp in fused_lora.all_sr_pads():
            dy_cfg = split_backward.split_config("dy_pass", dtype, srp)
            dx_cfg = split_backward.split_config("dx_pass", dtype, srp)
            assert dy_cfg.block_m == dx_cfg.block_m >= 16 and dy_cfg.block_n >= 16 and dx_cfg.block_k >= 16
    with pytest.raises(ValueError, match="unknown kernel 'backward'"):
        split_backward.split_config("backward", torch.bfloat16, 16)


@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "shape", [(6304, 768, [768, 768, 768]), (6304, 768, [768])], ids=["vit-b16-qkv", "vit-b16-out"]
)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_split_cuda_real_shapes(dtype, shape, p):
    m, k, sizes = shape
    case = make_case(m, k, sizes, 2, [True] * len(sizes), dtype, device="cuda")
    with split_backward_on():
        got = run_fused(case, p=p, seed=123, backend="triton")
    assert_close_to_reference(case, got, p=p, seed=123, dtype=dtype)
