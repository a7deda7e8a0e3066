"""What the light eager host path keeps between calls, and what it checks in one expression.

``lora_linear_packed`` caches the backend choice (keyed by the backend argument, the
``CLIP_LORA_BACKEND`` variable as read on that call, and the device) and the launch
constants (keyed by shapes, dtype and p), and checks its tensors in one expression with
the precise message from a slow path.  Each test here fails if a cache answers for the
wrong key or the fast check lets a bad input through:

* the environment variable changing between calls changes the backend; Triton on a CPU
  (the interpreter) is re-checked on every call;
* consecutive calls with other shapes get their own launch constants (right answers);
* contiguous operands whose size-1 dims have odd strides: the strides passed to the
  kernels follow from the shapes, which must address the same elements;
* a second derivative still fails loudly (the backward skips once_differentiable's
  no-grad block only when grad mode is already off);
* bad inputs the fast check sees first (0-d x, a non-tensor bias, mixed devices) get
  the slow path's messages.
"""

from __future__ import annotations

import pytest
import torch

from lora_kernels import fused_lora, lora_linear_packed, slot_layout
from lora_kernels.fused_lora import BACKEND_ENV

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # _use_triton only reads device.type


@pytest.fixture
def fresh_backends(monkeypatch):
    monkeypatch.setattr(fused_lora, "_BACKENDS", {})
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    return monkeypatch


def test_backend_follows_the_environment_between_calls(fresh_backends):
    mp = fresh_backends
    use = fused_lora._use_triton
    assert use(None, CPU) is False and use(None, CUDA) is True  # auto
    mp.setenv(BACKEND_ENV, "torch")
    assert use(None, CPU) is False and use(None, CUDA) is False
    mp.setenv(BACKEND_ENV, "triton")
    mp.setenv("TRITON_INTERPRET", "1")
    assert use(None, CPU) is True and use(None, CUDA) is True
    mp.setenv(BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match=r"backend must be .* got 'bogus' \(also check \$CLIP_LORA_BACKEND\)"):
        use(None, CPU)
    with pytest.raises(ValueError, match="got 'bogus'"):  # refused again, never cached
        use(None, CPU)
    assert use("torch", CUDA) is False  # the argument wins over the variable
    mp.delenv(BACKEND_ENV)
    assert use(None, CPU) is False and use(None, CUDA) is True
    with pytest.raises(ValueError, match="backend must be"):
        use(["triton"], CPU)  # unhashable: the usual message, not a TypeError from the cache


def test_triton_on_cpu_is_rechecked_every_call(fresh_backends):
    mp = fresh_backends
    mp.setenv("TRITON_INTERPRET", "1")
    assert fused_lora._use_triton("triton", CPU) is True
    mp.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fused_lora._use_triton("triton", CPU)


def _packed_case(M, K=8, sizes=(4, 6, 4), R=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = sum(sizes)
    x = torch.randn(M, K, generator=g)
    w, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    a = torch.randn(len(sizes) * R, K, generator=g)
    bb = torch.randn(N, R, generator=g)
    dy = torch.randn(M, N, generator=g)
    return x, w, b, a, bb, dy, slot_layout(K, sizes, R)


def _run(x, w, b, a, bb, dy, layout, backend=None, p=0.25):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, bb)]
    y = lora_linear_packed(
        leaves[0], w, b, lora_a=leaves[1], lora_b=leaves[2], layout=layout, scale=0.6, dropout_p=p, seed=9,
        backend=backend,
    )  # fmt: skip
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


def test_environment_picks_the_implementation_per_call(fresh_backends, monkeypatch):
    ran = []
    for name in ("_torch_forward", "_triton_forward"):
        real = getattr(fused_lora, name)
        spy = lambda *a, _real=real, _name=name, **k: ran.append(_name) or _real(*a, **k)  # noqa: E731
        monkeypatch.setattr(fused_lora, name, spy)
    case = _packed_case(5)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for value, want in (("torch", "_torch_forward"), ("triton", "_triton_forward"), ("torch", "_torch_forward")):
        monkeypatch.setenv(BACKEND_ENV, value)
        ran.clear()
        _run(*case)
        assert ran == [want]


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_each_shape_gets_its_own_launch_constants(p):
    # Row counts on both sides of the backward's row tile (32 for fp32): 1 and 3 tiles of
    # partials, then the first shape again.  Each against the PyTorch path.
    cases = [_packed_case(M, seed=M) for M in (5, 70, 5)]
    for case in cases:
        got, want = _run(*case, backend="triton", p=p), _run(*case, backend="torch", p=p)
        for g, r in zip(got, want, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    L5 = fused_lora._launch(5, 8, 14, 2, (4, 10, 14), torch.float32, p)
    L70 = fused_lora._launch(70, 8, 14, 2, (4, 10, 14), torch.float32, p)
    assert L5.shape == (5, 8, 14, 2) and L70.shape == (70, 8, 14, 2)
    assert L5.backward_rows == 1 and L70.backward_rows == 3


def test_contiguous_operands_with_odd_size_one_strides():
    # is_contiguous() ignores a size-1 dim's stride; the kernels then get the strides the
    # shapes imply, which must address the same elements.
    K, sizes, R = 8, (4, 6, 4), 1
    x, w, b, a, bb, dy, layout = _packed_case(1, K=K, sizes=sizes, R=R)
    N = sum(sizes)
    x_odd = torch.randn(K).as_strided((1, K), (1, 1)).copy_(x)
    bb_odd = torch.randn(N * 7).as_strided((N, 1), (1, 7)).copy_(bb)
    a_odd = torch.randn(3 * K).as_strided((3, K), (K, 1)).copy_(a)
    assert x_odd.is_contiguous() and bb_odd.is_contiguous() and x_odd.stride() != (K, 1) and bb_odd.stride() != (1, 1)
    leaves = [x_odd.requires_grad_(True), a_odd.requires_grad_(True), bb_odd.requires_grad_(True)]
    y = lora_linear_packed(
        leaves[0], w, b, lora_a=leaves[1], lora_b=leaves[2], layout=layout, scale=0.6, dropout_p=0.25, seed=9,
        backend="triton",
    )  # fmt: skip
    y.backward(dy)
    got = [y.detach()] + [t.grad for t in leaves]
    want = _run(x, w, b, a, bb, dy, layout, backend="torch")
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_second_derivative_fails_loudly(backend):
    x, w, b, a, bb, dy, layout = _packed_case(5)
    x, a, bb = (t.requires_grad_(True) for t in (x, a, bb))
    args = dict(lora_a=a, lora_b=bb, layout=layout, scale=0.6, dropout_p=0.25, seed=9, backend=backend)
    y = lora_linear_packed(x, w, b, **args)
    (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    assert gx.requires_grad
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        gx.sum().backward()
    # The plain backward (grad mode off in the engine) still gives the first derivative.
    y = lora_linear_packed(x, w, b, **args)
    y.backward(dy)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "over, error, match",
    [
        (dict(x=torch.tensor(1.0)), ValueError, "x must end in the weight's in_features 8"),
        (dict(bias=[0.0] * 14), TypeError, "bias must be a torch.Tensor"),
        (dict(bias=torch.ones(14, dtype=torch.long)), TypeError, "bias must be a floating-point tensor"),
        (dict(bias=torch.randn(14, device="meta")), ValueError, "x on cpu and bias on meta"),
        (dict(weight=torch.randn(14, 8, device="meta")), ValueError, "weight on meta"),
        (dict(x=torch.randn(5, 8, device="meta")), ValueError, "all tensors must be on one device"),
        (dict(lora_b=torch.randn(14, 2).t()), ValueError, r"lora_b \[14, 2\]"),
        (dict(x=torch.randn(3, 4, 9)), ValueError, "x must end in the weight's in_features 8"),
    ],
)
def test_fast_check_refusals_name_the_argument(over, error, match):
    x, w, b, a, bb, _dy, layout = _packed_case(5)
    args = dict(x=x, weight=w, bias=b, lora_a=a, lora_b=bb)
    args.update(over)
    with pytest.raises(error, match=match):
        lora_linear_packed(
            args["x"], args["weight"], args["bias"], lora_a=args["lora_a"], lora_b=args["lora_b"], layout=layout,
            scale=0.6, dropout_p=0.25, seed=9,
        )  # fmt: skip
