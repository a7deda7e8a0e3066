"""The public entry point: bad input, gradcheck, autocast, torch.compile, baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_cases import make_case, rel_err, run_reference

from lora_kernels import draw_seed, lora_linear, official_style_lora_linear, plain_lora_linear


def _args(**over):
    g = torch.Generator().manual_seed(0)
    args = dict(
        x=torch.randn(5, 8, generator=g),
        weight=torch.randn(12, 8, generator=g),
        bias=torch.randn(12, generator=g),
        lora_a=[torch.randn(2, 8, generator=g), None, torch.randn(2, 8, generator=g)],
        lora_b=[torch.randn(4, 2, generator=g), None, torch.randn(4, 2, generator=g)],
        scale=0.5,
        dropout_p=0.25,
        seed=1,
    )
    args.update(over)
    return args


def _call(**over):
    a = _args(**over)
    x, w, b = a.pop("x"), a.pop("weight"), a.pop("bias")
    return lora_linear(x, w, b, **a)


def test_valid_call_runs():
    assert _call().shape == (5, 12)


@pytest.mark.parametrize(
    "over, error, match",
    [
        (dict(x=torch.randn(5, 7)), ValueError, "in_features 8"),
        (dict(weight=torch.randn(12, 8, 1)), ValueError, "weight must be 2-D"),
        (dict(bias=torch.randn(11)), ValueError, r"bias must have shape \(12,\)"),
        (dict(slot_sizes=[4, 4, 3]), ValueError, "adding up to N=12"),
        (dict(slot_sizes=[6, 6]), ValueError, "slot_sizes"),
        (dict(lora_a=[torch.randn(2, 8)] * 4, lora_b=[torch.randn(3, 2)] * 4), ValueError, "between 1 and 3 slots"),
        (dict(lora_a=[torch.randn(2, 8), None, None]), ValueError, "slot 2: lora_a and lora_b must both"),
        (dict(lora_a=[torch.randn(2, 9), None, torch.randn(2, 8)]), ValueError, r"lora_a\[0\] must be \[r, 8\]"),
        (dict(lora_b=[torch.randn(5, 2), None, torch.randn(4, 2)]), ValueError, r"lora_b\[0\] must be \[4, 2\]"),
        (
            dict(
                lora_a=[torch.randn(2, 8), None, torch.randn(3, 8)],
                lora_b=[torch.randn(4, 2), None, torch.randn(4, 3)],
            ),
            ValueError,
            "share one rank",
        ),
        (dict(lora_a=[torch.randn(65, 8)], lora_b=[torch.randn(12, 65)]), ValueError, r"rank must be in 1\.\.64"),
        (dict(lora_a=[None, None, None], lora_b=[None, None, None]), ValueError, "no slot has an adapter"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
        (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
        (dict(seed=None), ValueError, "seed is required"),
        (dict(x=torch.randint(0, 3, (5, 8))), TypeError, "x must be a floating-point"),
        (dict(weight=torch.randn(12, 8).to(torch.int32)), TypeError, "weight must be a floating-point"),
        (dict(weight=torch.randn(12, 8, dtype=torch.float64)), TypeError, "must share a dtype"),
        (dict(x=torch.randn(5, 8, device="meta")), ValueError, "one device"),
        (dict(weight=torch.randn(12, 8, requires_grad=True)), ValueError, "must be frozen"),
        (dict(backend="cuda"), ValueError, "backend must be"),
        (dict(scale="0.5"), TypeError, "scale must be"),
        # Once accepted (and truncated, or read as a number) or failing far from the cause:
        (dict(scale=True), TypeError, "scale must be"),
        (dict(scale=float("nan")), ValueError, "scale must be finite"),
        (dict(lora_a=[np.ones((2, 8), np.float32), None, torch.randn(2, 8)]), TypeError, r"lora_a\[0\] must be"),
        (dict(lora_b=torch.randn(12, 2)), TypeError, "lora_b must be a list"),
        (dict(seed=torch.tensor([1, 2])), ValueError, "seed tensor must hold exactly one value"),
        (dict(seed=2.0), TypeError, "seed must be an int"),
        (dict(seed=torch.tensor(2.0)), TypeError, "seed tensor must have an integer dtype"),
        (dict(seed=torch.tensor(True)), TypeError, "seed tensor must have an integer dtype"),
        (dict(seed=True), TypeError, "seed must be an int"),
        (dict(seed=2**63), ValueError, "seed must fit in int64"),
        (dict(slot_sizes=[2.7, 2.2, 2.1]), TypeError, "slot_sizes must be a list of ints"),
        (dict(slot_sizes=[4, 4, True]), TypeError, "slot_sizes must be a list of ints"),
        (dict(dropout_p="0.25"), TypeError, "dropout_p must be"),
        (dict(dropout_p=torch.tensor(0.25)), TypeError, "dropout_p must be"),
        (dict(bias=[0.0] * 12), TypeError, "bias must be a torch.Tensor"),
    ],
)
def test_bad_input_gets_a_clear_error(over, error, match):
    with pytest.raises(error, match=match):
        _call(**over)


def test_triton_backend_without_gpu_or_interpreter_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        _call(backend="triton")


def test_gradcheck_torch_path_float64():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(9, 5, dtype=torch.float64, generator=g)
    b = torch.randn(9, dtype=torch.float64, generator=g)
    a = [torch.randn(2, 5, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2)]
    bb = [torch.randn(3, 2, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2)]

    def fn(x, a0, a2, b0, b2):
        return lora_linear(
            x, w, b, lora_a=[a0, None, a2], lora_b=[b0, None, b2], scale=0.8,
            dropout_p=0.3, seed=17, backend="torch",
        )

    assert torch.autograd.gradcheck(fn, (x, a[0], a[1], bb[0], bb[1]))


def test_autocast_keeps_fp32_masters_and_runs_in_half():
    case = make_case(40, 48, [16, 16, 16], 2, [True, True, True], torch.float32)
    x = case.x.clone().requires_grad_()
    a = [t.clone().requires_grad_() for t in case.lora_a]
    b = [t.clone().requires_grad_() for t in case.lora_b]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, case.weight, case.bias, lora_a=a, lora_b=b, scale=case.scale, dropout_p=0.25, seed=4)
    assert y.dtype == torch.bfloat16
    y.backward(case.dy.to(torch.bfloat16))
    assert x.grad.dtype == torch.float32  # the autocast cast back to the leaf's dtype
    assert all(t.grad.dtype == torch.float32 for t in a + b)
    ref = run_reference(case, p=0.25, seed=4)
    got = [y, x.grad, *[t.grad for t in a], *[t.grad for t in b]]
    for g_, r in zip(got, ref):
        # x and W rounded to bf16 by autocast: bf16-level error.
        assert rel_err(g_, r) < 1.5e-2


class _Projection(torch.nn.Module):
    """Minimal module in the style the CLIP layer uses: seed drawn per call."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        case = make_case(10, 16, [8, 8, 8], 2, [True, True, True], torch.float32)
        self.register_buffer("weight", case.weight)
        self.a = torch.nn.ParameterList([torch.nn.Parameter(t) for t in case.lora_a])
        self.b = torch.nn.ParameterList([torch.nn.Parameter(t) for t in case.lora_b])

    def forward(self, x):
        seed = draw_seed(x.device) if self.p > 0 else None
        a, b = list(self.a), list(self.b)
        y = lora_linear(x, self.weight, lora_a=a, lora_b=b, scale=0.5, dropout_p=self.p, seed=seed)
        return torch.nn.functional.gelu(y).sum()


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_torch_compile_fullgraph_no_graph_break(p):
    torch._dynamo.reset()
    module = _Projection(p)
    x = torch.randn(10, 16)
    torch.manual_seed(0)
    eager = module(x)
    eager.backward()
    eager_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    # fullgraph=True raises on any graph break; aot_eager traces forward and backward
    # through the custom ops' fake implementations.
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    out = compiled(x)
    out.backward()
    torch.testing.assert_close(out, eager)
    for p, g in zip(module.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)


def test_torch_library_opcheck():
    # torch's own consistency checks for custom ops: schema, fake tensor, autograd registration.
    from lora_kernels import fused_lora

    case = make_case(12, 16, [8, 8, 8], 2, [True, False, True], torch.float32)
    a_cat = torch.cat([case.lora_a[0], torch.zeros(2, 16), case.lora_a[2]]).requires_grad_()
    b_cat = torch.cat([case.lora_b[0], torch.zeros(8, 2), case.lora_b[2]]).requires_grad_()
    seed = torch.tensor(3)
    args = (case.x.requires_grad_(), case.weight, case.bias, a_cat, b_cat, seed, [8, 16, 24], 0b101, 0.5, 0.25, False)
    torch.library.opcheck(fused_lora.lora_linear_fwd, args)


def test_plain_baselines_match_fused_without_dropout():
    case = make_case(30, 24, [10, 10, 10], 2, [True, False, True], torch.float32)
    kwargs = dict(lora_a=case.lora_a, lora_b=case.lora_b, scale=case.scale, dropout_p=0.25, training=False)
    fused = lora_linear(case.x, case.weight, case.bias, lora_a=case.lora_a, lora_b=case.lora_b, scale=case.scale)
    torch.testing.assert_close(plain_lora_linear(case.x, case.weight, case.bias, **kwargs), fused)
    torch.testing.assert_close(official_style_lora_linear(case.x, case.weight, case.bias, **kwargs), fused)
