"""Seeded dropout: statistics, slot independence, and the masks the kernels really use."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAS_CUDA

from lora_kernels import draw_seed, dropout_mask, lora_linear
from lora_kernels.dropout import keep_scale, keep_threshold

DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("slot", [0, 1, 2])
def test_dropped_fraction_matches_p(p, slot):
    # p is realised in steps of 1/1024 (0.25 and 0.5 exactly); the rest within half a step.
    realised = keep_threshold(p) / 1024
    assert abs(realised - p) <= 1 / 2048
    mask = dropout_mask(1234, slot, 500, 400, p)
    n = mask.numel()
    dropped = 1.0 - mask.double().mean().item()
    std_err = math.sqrt(realised * (1 - realised) / n)
    assert abs(dropped - realised) < 5 * std_err, f"dropped {dropped:.4f}, expected {realised} ± {5 * std_err:.4f}"
    # Scaling by 1/P(keep) of the realised probability keeps the expectation exact.
    assert abs(keep_scale(p) * (1 - realised) - 1.0) < 1e-12


def test_rows_and_columns_are_not_patterned():
    # Each row and each column must drop about p of its entries; a hash that ignored
    # the row or the column would give rows/columns that are all kept or all dropped.
    mask = dropout_mask(77, 1, 400, 400, 0.25).double()
    for frac in (mask.mean(0), mask.mean(1)):
        # 0.12 is 5.5 standard errors of a 400-sample mean (sqrt(0.75·0.25/400) = 0.022).
        assert frac.min() > 0.75 - 0.12 and frac.max() < 0.75 + 0.12
    # Neighbouring rows are uncorrelated: 0.02 is 8 standard errors at 160 000 pairs.
    a, b = mask[:-1].flatten() - 0.75, mask[1:].flatten() - 0.75
    corr = (a * b).mean() / (a.square().mean() * b.square().mean()).sqrt()
    assert abs(corr.item()) < 0.02


def test_slots_are_independent():
    p = 0.25
    masks = [dropout_mask(42, s, 300, 300, p) for s in range(3)]
    n = masks[0].numel()
    for i in range(3):
        for j in range(i + 1, 3):
            both = (masks[i] & masks[j]).double().mean().item()
            expected = (1 - p) ** 2
            assert abs(both - expected) < 5 * math.sqrt(expected * (1 - expected) / n)


def test_three_slots_jointly_independent():
    # The three masks are fields of one hash: all eight keep/drop patterns must occur
    # with their product probabilities.
    p = 0.25
    m = [dropout_mask(9, s, 400, 400, p) for s in range(3)]
    n = m[0].numel()
    for pattern in range(8):
        hit = torch.ones_like(m[0])
        prob = 1.0
        for s in range(3):
            kept = bool(pattern >> s & 1)
            hit &= m[s] if kept else ~m[s]
            prob *= (1 - p) if kept else p
        freq = hit.double().mean().item()
        assert abs(freq - prob) < 5 * math.sqrt(prob * (1 - prob) / n), f"pattern {pattern:03b}: {freq} vs {prob}"


def test_slot_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="slot must be in 0..2"):
        dropout_mask(1, 3, 4, 4, 0.25)


def test_same_seed_same_mask_different_seed_different_mask():
    a = dropout_mask(5, 0, 64, 64, 0.25)
    assert torch.equal(a, dropout_mask(5, 0, 64, 64, 0.25))
    assert torch.equal(a, dropout_mask(torch.tensor(5), 0, 64, 64, 0.25))
    assert not torch.equal(a, dropout_mask(6, 0, 64, 64, 0.25))
    assert not torch.equal(a, dropout_mask(5, 1, 64, 64, 0.25))
    # A mask is a function of (seed, slot, row, column) only: a bigger request agrees
    # on the overlap.
    assert torch.equal(a, dropout_mask(5, 0, 100, 90, 0.25)[:64, :64])


def _identity_case(device, dtype=torch.float32):
    # K = r = N_s = 64 with A = B = I: slot s's output minus the frozen part is exactly
    # scale · (mask_s ⊙ x) / (1 - p), so the forward mask can be read off the output.
    g = torch.Generator().manual_seed(0)
    K = 64
    x = (torch.rand(37, K, generator=g) + 0.5).to(device=device, dtype=dtype)  # no zeros
    w = torch.randn(3 * K, K, generator=g).to(device=device, dtype=dtype) / 8
    eye = torch.eye(K, device=device)
    return x, w, [eye, eye, eye], [eye, eye, eye]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_forward_uses_the_helper_masks_per_slot(backend):
    p, seed = 0.25, 321
    x, w, a, b = _identity_case(DEVICE)
    y = lora_linear(x, w, lora_a=a, lora_b=b, scale=1.0, dropout_p=p, seed=seed, backend=backend)
    lora = (y - x @ w.t()) * (1 - p)
    for s in range(3):
        seen = lora[:, 64 * s : 64 * (s + 1)]
        expected = dropout_mask(seed, s, 37, 64, p, device=DEVICE)
        assert torch.equal(seen.abs() > 0.25, expected), f"slot {s}: forward mask differs from dropout_mask"
        torch.testing.assert_close(seen, x * expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_backward_regenerates_the_forward_masks(backend):
    # With A = I and dY = 1 on one slot, dX - dY W = scale · mask_s ⊙ (B_sᵀ·1) / (1-p):
    # the backward mask is read off dX and must equal the helper's (= forward) mask.
    p, seed = 0.25, 321
    x, w, a, b = _identity_case(DEVICE)
    for s in range(3):
        xg = x.clone().requires_grad_()
        y = lora_linear(xg, w, lora_a=a, lora_b=b, scale=1.0, dropout_p=p, seed=seed, backend=backend)
        dy = torch.zeros_like(y)
        dy[:, 64 * s : 64 * (s + 1)] = 1.0
        y.backward(dy)
        lora_grad = (xg.grad - dy @ w) * (1 - p)
        expected = dropout_mask(seed, s, 37, 64, p, device=DEVICE)
        assert torch.equal(lora_grad.abs() > 0.5, expected), f"slot {s}: backward mask differs"


def test_draw_seed_follows_torch_manual_seed():
    torch.manual_seed(0)
    first = [draw_seed() for _ in range(3)]
    torch.manual_seed(0)
    again = [draw_seed() for _ in range(3)]
    assert [int(s) for s in first] == [int(s) for s in again]
    assert len({int(s) for s in first}) == 3
