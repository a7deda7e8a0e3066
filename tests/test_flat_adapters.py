"""The flat adapter form (``lora_linear_packed(..., lora_ab=...)``) and N-D activations.

* ``lora_ab``, A_cat's elements then B_cat's in one 1-D tensor, gives the same output
  and dX bit for bit as the two packed tensors, and its gradient is exactly dA_cat then
  dB_cat, on both backends, with and without dropout, through both backwards (one-pass
  and split) and through the custom op that traced code takes;
* it is ONE autograd leaf: the output's graph reaches one AccumulateGrad for the adapters;
* a strided or offset flat tensor (a view into a larger buffer) gives the same result;
* a contiguous [..., K] x is read in place by the kernels (no reshape on either side);
  its output, dX and dropout masks equal those of the same rows passed as [M, K], and a
  non-contiguous N-D x still takes the reshaping path with the same result;
* bad input names the argument and the fix.

With a GPU the Triton cases run the compiled kernels on CUDA tensors (stage 1 of
``bench/gpu_session.sh``); without one, the interpreter on CPU tensors.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import HAS_CUDA

from bench.host_path import via_custom_op
from lora_kernels import fused_lora, lora_linear_packed, slot_layout

SIZES = (16, 24, 16)
R = 3
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _case(M=12, K=24, sizes=SIZES, absent=(), dtype=torch.float32, seed=0):
    """x, W, b, A_cat, B_cat (absent slots' rows zero), dY and the layout; fresh random values."""
    g = torch.Generator().manual_seed(seed)
    N = sum(sizes)
    x = torch.randn(M, K, generator=g).to(dtype)
    w, b = torch.randn(N, K, generator=g).to(dtype), torch.randn(N, generator=g).to(dtype)
    a_cat = torch.randn(len(sizes) * R, K, generator=g)
    b_cat = torch.randn(N, R, generator=g)
    starts = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    for s in absent:
        a_cat[s * R : (s + 1) * R] = 0
        b_cat[starts[s] : starts[s + 1]] = 0
    dy = torch.randn(M, N, generator=g).to(dtype)
    layout = slot_layout(K, sizes, R, [s not in absent for s in range(len(sizes))])
    return (*(t.to(DEVICE) for t in (x, w, b, a_cat, b_cat, dy)), layout)


def _run(x, w, b, dy, layout, *, backend, p, lora_a=None, lora_b=None, lora_ab=None, x_shape=None):
    """y, dX and the adapters' gradients (flat: one tensor) of one forward+backward."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (lora_a, lora_b, lora_ab) if t is not None]
    xin = x.detach().clone().reshape(x_shape or x.shape).requires_grad_(True)
    adapters = dict(lora_ab=leaves[0]) if lora_ab is not None else dict(lora_a=leaves[0], lora_b=leaves[1])
    y = lora_linear_packed(
        xin, w, b, **adapters, layout=layout, scale=0.7, dropout_p=p, seed=19 if p else None, backend=backend
    )
    y.backward(dy.reshape(y.shape))
    return y.detach(), xin.grad, [t.grad for t in leaves]


@contextlib.contextmanager
def _backward_impl(impl):
    saved = fused_lora.BACKWARD_IMPL
    fused_lora.BACKWARD_IMPL = impl
    try:
        yield
    finally:
        fused_lora.BACKWARD_IMPL = saved


# The split backward is a Triton path: the torch backend has one backward.
BACKWARDS = [("torch", "fused"), ("triton", "fused"), ("triton", "split")]


@pytest.mark.parametrize("backend, impl", BACKWARDS)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("absent", [(), (1,)])
def test_flat_equals_two_tensors(backend, impl, p, absent):
    x, w, b, a_cat, b_cat, dy, layout = _case(absent=absent)
    with _backward_impl(impl):
        y2, dx2, (da, db) = _run(x, w, b, dy, layout, backend=backend, p=p, lora_a=a_cat, lora_b=b_cat)
        ab = torch.cat([a_cat.reshape(-1), b_cat.reshape(-1)])
        y1, dx1, (dab,) = _run(x, w, b, dy, layout, backend=backend, p=p, lora_ab=ab)
    assert dab.shape == ab.shape == layout.ab_shape
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)
    assert torch.equal(dab, torch.cat([da.reshape(-1), db.reshape(-1)]))
    assert da.abs().max() > 0 and db.abs().max() > 0  # both halves carry signal
    assert all(torch.isfinite(t).all() for t in (y1, dx1, dab))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_flat_through_the_custom_op(backend):
    """Traced code (torch.compile) takes the custom op with differentiable views of the
    flat tensor: the same values as the eager Function."""
    x, w, b, a_cat, b_cat, dy, layout = _case()
    ab = torch.cat([a_cat.reshape(-1), b_cat.reshape(-1)])
    eager = _run(x, w, b, dy, layout, backend=backend, p=0.25, lora_ab=ab)
    with via_custom_op():
        traced = _run(x, w, b, dy, layout, backend=backend, p=0.25, lora_ab=ab)
    assert torch.equal(eager[0], traced[0]) and torch.equal(eager[1], traced[1])
    assert torch.equal(eager[2][0], traced[2][0])


def test_flat_is_one_autograd_leaf():
    x, w, b, a_cat, b_cat, _dy, layout = _case()
    ab = torch.cat([a_cat.reshape(-1), b_cat.reshape(-1)]).requires_grad_(True)
    xin = x.clone().requires_grad_(True)
    y = lora_linear_packed(xin, w, b, lora_ab=ab, layout=layout, scale=0.7, backend="triton")
    leaves = [f.variable for f, _ in y.grad_fn.next_functions if f is not None and hasattr(f, "variable")]
    assert len(leaves) == 2 and leaves[0] is xin and leaves[1] is ab


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("where", ["strided", "offset"])
def test_flat_view_into_a_larger_buffer(backend, where):
    """A flat tensor that is a view (every other element, or starting mid-buffer) reads
    and receives the same values as a contiguous one."""
    x, w, b, a_cat, b_cat, dy, layout = _case(seed=2)
    ab = torch.cat([a_cat.reshape(-1), b_cat.reshape(-1)])
    n = ab.numel()
    buf = torch.randn(2 * n + 5, device=DEVICE)
    view = buf[1 : 2 * n + 1 : 2] if where == "strided" else buf[5 : 5 + n]
    view.copy_(ab)
    assert view.storage_offset() > 0 and (view.stride(0) == 2) == (where == "strided")
    want = _run(x, w, b, dy, layout, backend=backend, p=0.25, lora_ab=ab)
    leaf = view.detach().requires_grad_(True)  # same storage, stride and offset
    xin = x.clone().requires_grad_(True)
    y = lora_linear_packed(xin, w, b, lora_ab=leaf, layout=layout, scale=0.7, dropout_p=0.25, seed=19, backend=backend)
    y.backward(dy)
    assert torch.equal(y.detach(), want[0]) and torch.equal(xin.grad, want[1])
    assert torch.equal(leaf.grad, want[2][0])


@pytest.mark.parametrize("backend, impl", BACKWARDS)
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 2), (12,)])
def test_nd_input_equals_rows(backend, impl, shape):
    """[..., K] activations (a module's [batch, tokens, K]) give what their rows give as
    [M, K]: output, dX (in x's shape), gradients and the dropout masks, which are indexed
    by the flattened row."""
    x, w, b, a_cat, b_cat, dy, layout = _case(M=12)
    K = x.shape[1]
    with _backward_impl(impl):
        want = _run(x, w, b, dy, layout, backend=backend, p=0.25, lora_a=a_cat, lora_b=b_cat)
        got = _run(x, w, b, dy, layout, backend=backend, p=0.25, lora_a=a_cat, lora_b=b_cat, x_shape=(*shape, K))
    assert got[0].shape == (*shape, sum(SIZES)) and got[1].shape == (*shape, K)
    assert torch.equal(got[0].reshape(want[0].shape), want[0])
    assert torch.equal(got[1].reshape(want[1].shape), want[1])
    for g, r in zip(got[2], want[2], strict=True):
        assert torch.equal(g, r)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_nd_input(backend):
    """A permuted [B, T, K] x cannot be read as [M, K] in place: it is reshaped (copied),
    with the same result as its rows."""
    x, w, b, a_cat, b_cat, dy, layout = _case(M=12)
    K = x.shape[1]
    want = _run(x, w, b, dy, layout, backend=backend, p=0.25, lora_a=a_cat, lora_b=b_cat)
    xp = x.reshape(3, 4, K).permute(2, 0, 1).contiguous().permute(1, 2, 0).requires_grad_(True)
    assert not xp.is_contiguous()
    y = lora_linear_packed(
        xp, w, b, lora_a=a_cat, lora_b=b_cat, layout=layout, scale=0.7, dropout_p=0.25, seed=19, backend=backend
    )
    y.backward(dy.reshape(y.shape))
    assert torch.equal(y.detach().reshape(want[0].shape), want[0])
    assert torch.equal(xp.grad.reshape(want[1].shape), want[1])


def _flat_args(**over):
    g = torch.Generator().manual_seed(1)
    layout = slot_layout(8, [4, 4, 4], 2)
    args = dict(
        x=torch.randn(5, 8, generator=g),
        weight=torch.randn(12, 8, generator=g),
        bias=torch.randn(12, generator=g),
        lora_ab=torch.randn(layout.ab_shape[0], generator=g),
        layout=layout,
        scale=0.5,
        dropout_p=0.25,
        seed=1,
    )
    args.update(over)
    return args


def test_flat_valid_call_runs():
    a = _flat_args()
    assert a["layout"].ab_shape == (6 * 8 + 12 * 2,)
    assert lora_linear_packed(a.pop("x"), a.pop("weight"), a.pop("bias"), **a).shape == (5, 12)


@pytest.mark.parametrize(
    "over, error, match",
    [
        (dict(lora_a=torch.randn(6, 8)), TypeError, "either as lora_a and lora_b or as lora_ab, not both"),
        (dict(lora_ab=None), TypeError, r"needs lora_a and lora_b, or lora_ab"),
        (dict(lora_ab=torch.randn(71)), ValueError, r"lora_ab must be 1-D with 72 elements \(A_cat \[6, 8\]"),
        (dict(lora_ab=torch.randn(6, 12)), ValueError, r"lora_ab must be 1-D with 72 elements"),
        (dict(lora_ab=torch.ones(72, dtype=torch.long)), TypeError, "lora_ab must be a floating-point tensor"),
        (dict(lora_ab=torch.randn(72, device="meta")), ValueError, "one device.*lora_ab on meta"),
    ],
)
def test_flat_bad_input(over, error, match):
    a = _flat_args(**over)
    with pytest.raises(error, match=match):
        lora_linear_packed(a.pop("x"), a.pop("weight"), a.pop("bias"), **a)


@pytest.mark.parametrize("backend, impl", BACKWARDS)
def test_vector_input_is_one_row(backend, impl):
    """A 1-D x [K] is one row: y [N] and dX [K] equal those of x as [1, K]."""
    x, w, b, a_cat, b_cat, dy, layout = _case(M=1, seed=4)
    with _backward_impl(impl):
        want = _run(x, w, b, dy, layout, backend=backend, p=0.25, lora_a=a_cat, lora_b=b_cat)
        got = _run(x, w, b, dy, layout, backend=backend, p=0.25, lora_a=a_cat, lora_b=b_cat, x_shape=x.shape[1:])
    assert got[0].shape == (sum(SIZES),) and got[1].shape == (x.shape[1],)
    assert torch.equal(got[0], want[0][0]) and torch.equal(got[1], want[1][0])
    for g, r in zip(got[2], want[2], strict=True):
        assert torch.equal(g, r)
