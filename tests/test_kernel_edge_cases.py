"""Inputs the API accepts that once came back wrong: each test failed before its fix.

Strided and stride-0 operands, seeds across the whole int64 range, fake tensors that
must describe the real outputs (opcheck), NaN that must stay in its own slot and at
dropped positions behave as ``F.dropout`` (x · mask), and fp16 adapter masters under
bf16 autocast.  Both backends; the Triton one through the interpreter on CPU.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from conftest import HAS_CUDA
from kernel_cases import make_case, rel_err, run_reference

from lora_kernels import dropout_mask, fused_lora, lora_linear
from lora_kernels.dropout import seed_word

DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = ["triton", "torch"]


def _grads(x, w, b, a, bb, dy, backend, **kw):
    x = x.detach().clone().requires_grad_()
    a = [t.detach().clone().requires_grad_() if t is not None else None for t in a]
    bb = [t.detach().clone().requires_grad_() if t is not None else None for t in bb]
    y = lora_linear(x, w, b, lora_a=a, lora_b=bb, backend=backend, **kw)
    y.backward(dy)
    return [y.detach(), x.grad] + [t.grad for t in a if t is not None] + [t.grad for t in bb if t is not None]


# --------------------------------------------------------------------------- strides


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias_layout", ["strided", "stride0"])
def test_any_bias_and_weight_layout(backend, bias_layout):
    # The forward kernel once read bias[n] with unit stride: a [::2] view came back off
    # by ~2.6, a stride-0 bias read past its allocation.  W and x as transposed views too.
    case = make_case(37, 45, [20, 23, 21], 3, [True, False, True], torch.float32, device=DEVICE)
    N = 64
    # Built on the device: .to(device) of an expanded tensor would copy it contiguous.
    if bias_layout == "strided":
        bias = torch.randn(2 * N, device=DEVICE)[::2]
    else:
        bias = torch.tensor([0.7], device=DEVICE).expand(N)
    case.bias = bias
    case.weight = case.weight.t().contiguous().t()
    case.x = case.x.t().contiguous().t()
    assert not (case.bias.is_contiguous() or case.weight.is_contiguous() or case.x.is_contiguous())
    got = _grads(
        case.x, case.weight, case.bias, case.lora_a, case.lora_b, case.dy, backend,
        scale=case.scale, slot_sizes=case.slot_sizes, dropout_p=0.25, seed=5,
    )
    for g, r in zip(got, run_reference(case, p=0.25, seed=5)):
        assert rel_err(g, r) < 1e-5


def test_int32_offsets_never_overflow_on_huge_strides():
    # The kernels compute the column part of each address in int32; a layout that could
    # overflow it is copied, an ordinary one is passed through as it is.
    x = torch.empty(4, 6).t()
    assert fused_lora._addressable(x) is x
    huge = torch.empty(2, 3, device="meta").as_strided((2, 3), (1, 2**31))
    assert fused_lora._addressable(huge).is_contiguous()
    assert fused_lora._addressable(huge, wide_dims=(1,)) is huge


# --------------------------------------------------------------------------- seeds

SEEDS = [0, 7, -1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 5, -(2**63), 2**63 - 1]


def _applied_masks(seed, backend, M=9, K=16):
    # A = B = I (r = K = N_s): slot s's output minus the frozen part is ks · mask_s ⊙ x,
    # with x in [1, 2), so the applied forward mask reads off exactly.
    g = torch.Generator().manual_seed(1)
    x = (1 + torch.rand(M, K, generator=g)).to(DEVICE)
    w = (torch.randn(2 * K, K, generator=g) / 8).to(DEVICE)
    eye = torch.eye(K, device=DEVICE)
    y = lora_linear(x, w, lora_a=[eye, eye], lora_b=[eye, eye], scale=1.0, dropout_p=0.5, seed=seed, backend=backend)
    lora = y - x @ w.t()
    return [lora[:, s * K : (s + 1) * K] > 0.5 for s in range(2)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_int64_seed_applies_dropout_masks_mask(backend):
    # lora_linear once reduced an int seed mod 2^31 - 1 and dropout_mask took its low 32
    # bits, so seeds such as -1 or 2^31 got a mask other than the one reported.
    seen = {}
    for seed in SEEDS:
        for as_tensor in (False, True):
            arg = torch.tensor(seed, dtype=torch.int64) if as_tensor else seed
            masks = _applied_masks(arg, backend)
            for s, mask in enumerate(masks):
                expected = dropout_mask(seed, s, 9, 16, 0.5, device=DEVICE)
                assert torch.equal(mask, expected), f"seed {seed} (tensor={as_tensor}) slot {s}"
        seen[seed] = masks[0]
    # One mapping, documented: the seed itself for 0 <= seed < 2^32, so 0 and 2^31 - 1
    # (once the same dropout) differ, and so do -1 and 0.
    assert seed_word(2**31 - 1) == 2**31 - 1 and seed_word(2**32 + 5) == 5 ^ 0x9E3779B9
    assert not torch.equal(seen[0], seen[2**31 - 1])
    assert not torch.equal(seen[0], seen[-1])


def test_dropout_mask_takes_int_and_tensor_seeds_alike():
    for seed in SEEDS:
        assert torch.equal(dropout_mask(seed, 1, 5, 7, 0.3), dropout_mask(torch.tensor(seed), 1, 5, 7, 0.3))
        assert torch.equal(dropout_mask(seed, 1, 5, 7, 0.3), dropout_mask(torch.tensor([seed]), 1, 5, 7, 0.3))


@pytest.mark.parametrize(
    "seed, error",
    [(1.5, TypeError), (True, TypeError), (torch.tensor(1.0), TypeError), (torch.tensor([1, 2]), ValueError),
     (torch.tensor(True), TypeError), (2**63, ValueError), ("3", TypeError)],
)
def test_dropout_mask_rejects_bad_seeds(seed, error):
    with pytest.raises(error, match="seed"):
        dropout_mask(seed, 0, 4, 4, 0.25)


# --------------------------------------------------------------------------- opcheck


def _layouts(M, K, device="cpu"):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2 * M, 2 * K + 1, generator=g).to(device)
    return {
        "contiguous": base[:M, :K].contiguous(),
        "transposed": base[:K, :M].t(),  # unit stride along M
        "sliced": base[1 : M + 1, 1::2][:, :K],
        # a transposed view
        "from_3d": torch.randn(K, 2, M // 2, generator=g).to(device).permute(1, 2, 0).reshape(M, K),
    }


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced", "from_3d"])
def test_opcheck_on_strided_inputs(layout, use_triton):
    # The backward's fake once returned empty_like(x): x's strides, while the real dX is
    # contiguous.  opcheck's test_faketensor compares the fake's strides with the real.
    if use_triton and not HAS_CUDA:
        fused_lora._use_triton("triton", torch.device("cpu"))  # installs the interpreter's bf16 patch
    M, K = 12, 10
    x = _layouts(M, K, DEVICE)[layout]
    assert x.is_contiguous() == (layout == "contiguous")
    case = make_case(M, K, [8, 8, 8], 2, [True, False, True], torch.float32, device=DEVICE)
    zeros = torch.zeros(2, K, device=DEVICE)
    a_cat = torch.cat([case.lora_a[0], zeros, case.lora_a[2]]).requires_grad_()
    b_cat = torch.cat([case.lora_b[0], zeros.new_zeros(8, 2), case.lora_b[2]]).t().contiguous().t().requires_grad_()
    seed = torch.tensor(-3, device=DEVICE)
    bounds, adapted = [8, 16, 24], 0b101
    w = case.weight.t().contiguous().t()
    bias = torch.randn(48, device=DEVICE)[::2]
    fwd_args = (x.requires_grad_(), w, bias, a_cat, b_cat, seed, bounds, adapted, 0.5, 0.25, use_triton)
    torch.library.opcheck(fused_lora.lora_linear_fwd, fwd_args)
    h = fused_lora.lora_linear_fwd(*fwd_args)[1].detach()
    dy = torch.randn(24, M, device=DEVICE).t()  # a transposed dY as well
    bwd_args = (dy, x.detach(), w, h, a_cat.detach(), b_cat.detach(), seed, bounds, adapted, 0.5, 0.25, use_triton)
    torch.library.opcheck(fused_lora.lora_linear_bwd, bwd_args)


# --------------------------------------------------------------------------- NaN


def _nan_case():
    # Three adapted slots of odd widths; x[2, 1] is dropped by slot 0 and kept by slot 1.
    return make_case(9, 12, [5, 7, 6], 2, [True, True, True], torch.float64, device=DEVICE, seed=3)


def _inject(case, where):
    if where == "x_dropped":
        assert not dropout_mask(11, 0, 9, 12, 0.25)[2, 1] and dropout_mask(11, 1, 9, 12, 0.25)[2, 1]
        case.x[2, 1] = float("nan")
    elif where == "a_slot1":
        case.lora_a[1][0, 4] = float("nan")
    elif where == "b_slot2":
        case.lora_b[2][2, 1] = float("nan")
    elif where == "dy_slot0":
        case.dy[4, 2] = float("nan")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["x_dropped", "a_slot1", "b_slot2", "dy_slot0"])
def test_nan_lands_where_the_reference_puts_it(backend, where):
    # The reference is x·mask through autograd (what F.dropout does): a NaN stays in its
    # own slot, and a NaN at a dropped position is still NaN (NaN·0).  The Triton path
    # once leaked NaN across slots through NaN·0 in its block-diagonal B, and dropped
    # NaNs by selecting instead of multiplying.
    case = _nan_case()
    _inject(case, where)
    ref = run_reference(case, p=0.25, seed=11)
    dtype = torch.float32  # the kernels' dtype; fp64 reference
    cast = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
    got = _grads(
        cast(case.x), cast(case.weight), cast(case.bias), [cast(t) for t in case.lora_a],
        [cast(t) for t in case.lora_b], cast(case.dy), backend,
        scale=case.scale, slot_sizes=case.slot_sizes, dropout_p=0.25, seed=11,
    )
    names = ["y", "dX", "dA0", "dA1", "dA2", "dB0", "dB1", "dB2"]
    for name, g, r in zip(names, got, ref):
        assert torch.equal(g.isnan().cpu(), r.isnan().cpu()), f"{name}: NaN at {g.isnan().nonzero().tolist()}"
        finite = ~r.isnan()
        if finite.any():
            assert rel_err(g[finite], r[finite]) < 1e-5, name
    # The cases the issue names, spelled out.
    if where == "a_slot1":
        assert got[0][:, 5:12].isnan().all() and not got[0][:, :5].isnan().any() and not got[0][:, 12:].isnan().any()
    if where == "dy_slot0":
        assert got[2].isnan().all() and not got[3].isnan().any() and not got[4].isnan().any()
    if where == "x_dropped":
        assert all(t[:, 1].isnan().all() for t in got[2:5])


# --------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_adapter_masters_under_bf16_autocast(backend):
    # Once crashed in autocast's torch.cat ("Unexpected floating ScalarType").
    case = make_case(
        20, 24, [16, 16, 16], 2, [True, False, True], torch.float32, device=DEVICE, param_dtype=torch.float16
    )
    x = case.x.clone().requires_grad_()
    a = [t.clone().requires_grad_() if t is not None else None for t in case.lora_a]
    b = [t.clone().requires_grad_() if t is not None else None for t in case.lora_b]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = lora_linear(
            x, case.weight, case.bias, lora_a=a, lora_b=b, scale=case.scale, dropout_p=0.25, seed=4, backend=backend
        )
    assert y.dtype == torch.bfloat16
    y.backward(case.dy.to(torch.bfloat16))
    grads = [t.grad for t in a + b if t is not None]
    assert all(g.dtype == torch.float16 for g in grads)
    ref = run_reference(case, p=0.25, seed=4)
    for g, r in zip([y, x.grad, *grads], ref):
        assert rel_err(g, r) < 1.5e-2  # x and W rounded to bf16 by autocast


# --------------------------------------------------------------------------- interpreter


@triton.jit
def _round_trip_kernel(src_ptr, bf16_ptr, prod_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    v = tl.load(src_ptr + offs, mask=ok).to(tl.bfloat16)  # fp32 -> bf16
    tl.store(bf16_ptr + offs, v, mask=ok)
    tl.store(prod_ptr + offs, v * v, mask=ok)  # bf16 arithmetic


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU interpreter's bf16 patch")
def test_interpreter_bf16_rounds_like_a_gpu():
    # The interpreter once truncated fp32 -> bf16 (biasing every bf16 result toward zero,
    # doubling the kernels' error on CPU) and multiplied bf16 bit patterns as integers.
    fused_lora._use_triton("triton", torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    src = torch.cat([
        torch.randn(200, generator=g) * 100,
        torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.0e38, float("nan"), float("inf"), -0.0]),
    ])
    n = src.numel()
    out = torch.empty(n, dtype=torch.bfloat16)
    prod = torch.empty(n, dtype=torch.bfloat16)
    _round_trip_kernel[(1,)](src, out, prod, n, BLOCK=256)
    want = src.to(torch.bfloat16)  # round to nearest, ties to even
    for got, ref in ((out, want), (prod, want * want)):
        assert torch.equal(got.isnan(), ref.isnan())  # NaN stays NaN (its payload may differ)
        number = ~ref.isnan()
        assert torch.equal(got[number].view(torch.int16), ref[number].view(torch.int16))
