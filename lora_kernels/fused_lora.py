"""Fused LoRA linear layer: ``Y = X Wᵀ + b + scale · (drop(X) Aᵀ) Bᵀ`` and its backward.

The N output columns are split into S *slots* (S = 1 for a plain projection, S = 3 for
CLIP's packed q/k/v ``in_proj_weight``).  Each slot ``s`` owns the column range
``[off_s, off_s + N_s)`` and an optional rank-R adapter ``A_s [R, K]``, ``B_s [N_s, R]``
whose input goes through its own dropout mask ``mask_s`` (see :mod:`.dropout`).
Packed, the adapters are ``A_cat [S·R, K]`` (slot s in rows ``s·R … s·R+R``) and
``B_cat [N, R]`` (slot s in rows ``off_s … off_s+N_s``); a slot with no adapter has zero
rows in both and its mask is never generated.

Math (per slot s, with ``keep = 1 / P(keep)``, i.e. 1 / (1 - p); see :mod:`.dropout`)::

    H_s  = keep · (mask_s ⊙ X) A_sᵀ                      [M, R]   (fp32, saved)
    Y_s  = X W_sᵀ + b_s + scale · H_s B_sᵀ
    dH_s = scale · dY_s B_s
    dB_s = scale · dY_sᵀ H_s
    dA_s = keep · dH_sᵀ (mask_s ⊙ X)
    dX   = dY W + keep · Σ_s mask_s ⊙ (dH_s A_s)

Passes over the big tensors (X, W, Y, dY, dX); everything else is M×S·R or smaller:

    forward   shrink kernel   reads X once                       -> H [M, S·R]
              GEMM kernel     reads X and W (tiled, as any GEMM), writes Y once;
                              the epilogue adds scale·H Bᵀ and the bias.
    backward  one kernel      reads dY and W (tiled, as any GEMM), reads X once,
                              writes dX once.  Its N loop also accumulates dH
                              (recomputed per K-tile: a 16-wide dot, no extra memory)
                              and, spread over the K-tiles, the dB partials; the
                              epilogue regenerates each slot's mask on its X tile and
                              adds the masked dH·A term to dX and the dA partials.
              reductions      dA, dB partials [M/BLOCK_M, …] summed in a fixed order.
    (:mod:`.split_backward` holds the alternative: dY W by cuBLAS, then one Triton pass
    over dY and one over X and dX; ``BACKWARD_IMPL`` below selects it.)

    Column tiles never straddle two slots (:func:`_slot_tile`), so a NaN or Inf in one
    slot's A, B, H or dY never meets another slot's values as NaN·0; dropout multiplies
    by the mask, as ``F.dropout`` does, so a NaN at a dropped position stays NaN.

    X: 2 reads forward + 1 read backward.  Y: 1 write.  dY: read once per K-tile (the
    GEMM's own re-reads).  dX: 1 write.  Nothing mask-sized is stored; the saved
    tensors are X, H and the seed.

File ladder: plain PyTorch implementation (the CPU path), Triton kernels, host
launchers, ``torch.library`` custom ops with autograd, keyword-only entry point.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._compat import check_interpreter_versions
from ._interpreter import patch_bf16_dot
from .dropout import (
    MAX_MASK_SLOTS,
    SEED_MAX,
    check_seed,
    fold_seed,
    keep_from_hash,
    keep_scale,
    keep_threshold,
    mask_hash,
    row_hash,
    slot_keep,
    tile_hash,
)

MAX_SLOTS = MAX_MASK_SLOTS  # q, k, v: one 10-bit mask field per slot
MAX_RANK = 64
BACKEND_ENV = "CLIP_LORA_BACKEND"  # "triton" forces the kernels, "torch" the plain path

# =============================================================================
# 1. Plain PyTorch implementation of the same math (the CPU path)
# =============================================================================


def _slot_ranges(slot_bounds: Sequence[int]) -> list[tuple[int, int]]:
    starts = [0, *slot_bounds[:-1]]
    return list(zip(starts, slot_bounds))


def _torch_masks(seed, M, K, num_slots, adapted, p, device):
    if p == 0.0:
        return [None] * num_slots
    h = mask_hash(seed, M, K, device)
    return [keep_from_hash(h, s, p) if (adapted >> s) & 1 else None for s in range(num_slots)]


def _torch_forward(x, weight, bias, lora_a, lora_b, seed, slot_bounds, adapted, scale, p):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    M, K = x.shape
    R = lora_b.shape[1]
    xf = x.to(acc)
    y = xf @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    h = torch.zeros(M, len(slot_bounds) * R, dtype=acc, device=x.device)
    masks = _torch_masks(seed, M, K, len(slot_bounds), adapted, p, x.device)
    keep = keep_scale(p)
    for s, (lo, hi) in enumerate(_slot_ranges(slot_bounds)):
        if not (adapted >> s) & 1:
            continue
        a_s = lora_a[s * R : (s + 1) * R].to(acc)
        xs = xf if masks[s] is None else xf * masks[s] * keep
        h[:, s * R : (s + 1) * R] = xs @ a_s.t()
        y[:, lo:hi] += scale * (h[:, s * R : (s + 1) * R] @ lora_b[lo:hi].to(acc).t())
    return y.to(x.dtype), h


def _torch_backward(dy, x, weight, h, lora_a, lora_b, seed, slot_bounds, adapted, scale, p):
    acc = h.dtype
    M, K = x.shape
    R = lora_b.shape[1]
    dyf, xf = dy.to(acc), x.to(acc)
    dx = dyf @ weight.to(acc)
    da = torch.zeros(lora_a.shape, dtype=acc, device=x.device)
    db = torch.zeros(lora_b.shape, dtype=acc, device=x.device)
    masks = _torch_masks(seed, M, K, len(slot_bounds), adapted, p, x.device)
    keep = keep_scale(p)
    for s, (lo, hi) in enumerate(_slot_ranges(slot_bounds)):
        if not (adapted >> s) & 1:
            continue
        dh = scale * (dyf[:, lo:hi] @ lora_b[lo:hi].to(acc))
        db[lo:hi] = scale * (dyf[:, lo:hi].t() @ h[:, s * R : (s + 1) * R])
        up = dh @ lora_a[s * R : (s + 1) * R].to(acc)
        xs = xf
        if masks[s] is not None:
            up, xs = up * masks[s] * keep, xf * masks[s] * keep
        dx += up
        da[s * R : (s + 1) * R] = dh.t() @ xs
    return dx.to(x.dtype), da.to(lora_a.dtype), db.to(lora_b.dtype)


# =============================================================================
# 2. Triton kernels
# =============================================================================


@triton.jit
def _num_slot_tiles(N, bound1, bound2, BLOCK_N: tl.constexpr):
    # Column tiles when each slot is tiled on its own (unused bounds are N: no tiles).
    return tl.cdiv(bound1, BLOCK_N) + tl.cdiv(bound2 - bound1, BLOCK_N) + tl.cdiv(N - bound2, BLOCK_N)


@triton.jit
def _slot_tile(t, N, bound1, bound2, BLOCK_N: tl.constexpr):
    """Column tile ``t`` -> (its slot, first column, end of its slot).

    Slots are tiled one after another, so no tile straddles two slots: a slot's values
    then never meet another slot's through a dot, and a NaN or Inf in one slot cannot
    reach the others as NaN·0.  CLIP's slot widths (multiples of 64) tile exactly as
    the plain N loop would; an odd slot width costs one partial tile.
    """
    t1 = tl.cdiv(bound1, BLOCK_N)
    t2 = t1 + tl.cdiv(bound2 - bound1, BLOCK_N)
    slot = (t >= t1).to(tl.int32) + (t >= t2).to(tl.int32)
    lo = tl.where(t >= t2, bound2, tl.where(t >= t1, bound1, 0))
    hi = tl.where(t >= t2, N, tl.where(t >= t1, bound2, bound1))
    first = tl.where(t >= t2, t2, tl.where(t >= t1, t1, 0))
    return slot, lo + (t - first) * BLOCK_N, hi


@triton.jit
def _tile_ids(num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Grouped ordering (Triton tutorial 03): neighbouring programs share row tiles in L2.
    pid = tl.program_id(0)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    return pid_m, pid_n, num_pid_n


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, h_ptr, seed_ptr,
    M, K, R, num_slots, adapted, threshold, keep_scale,
    stride_xm, stride_xk, stride_am, stride_ak,
    HAS_DROPOUT: tl.constexpr, SR_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """H[M, S·R] = keep · Σ_s (mask_s ⊙ X) A_sᵀ, reading each X tile once for all slots."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = tl.arange(0, SR_PAD)  # adapter column s·R + j; SR_PAD >= 16 for tensor-core dots
    m_ok = offs_m < M
    SR = num_slots * R
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, SR_PAD), dtype=tl.float32)
    if HAS_DROPOUT:
        row_h = row_hash(fold_seed(tl.load(seed_ptr)), offs_m)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        a_ptrs = a_ptr + offs_i[None, :] * stride_am + offs_k[:, None] * stride_ak  # A_catᵀ tile
        if HAS_DROPOUT:
            h = tile_hash(row_h, offs_k)  # one hash per element, shared by all slots
            for s in range(num_slots):
                if (adapted >> s) & 1:
                    in_slot = (offs_i >= s * R) & (offs_i < s * R + R)
                    a = tl.load(a_ptrs, mask=k_ok[:, None] & in_slot[None, :], other=0.0)
                    # x · mask, as F.dropout: a NaN or Inf at a dropped position gives NaN.
                    xs = x * slot_keep(h, s, threshold).to(x.dtype)
                    acc += tl.dot(xs, a.to(x.dtype), input_precision=DOT_PRECISION)
        else:
            a = tl.load(a_ptrs, mask=k_ok[:, None] & (offs_i < SR)[None, :], other=0.0)
            acc += tl.dot(x, a.to(x.dtype), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        acc *= keep_scale
    h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * SR + offs_i[None, :]
    tl.store(h_ptrs, acc, mask=m_ok[:, None] & (offs_i < SR)[None, :])


@triton.jit
def _lora_forward_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, b_ptr, y_ptr,
    M, N, K, R, SR, bound1, bound2, scale,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bn, stride_br, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, SR_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Y = X Wᵀ, with scale·H Bᵀ and the bias added in the epilogue (Y written once).

    Each column tile lies in one slot (:func:`_slot_tile`)."""
    num_pid_n = _num_slot_tiles(N, bound1, bound2, BLOCK_N)
    pid_m, pid_n, _ = _tile_ids(tl.cdiv(M, BLOCK_M), num_pid_n, GROUP_M)
    slot, n0, n_end = _slot_tile(pid_n, N, bound1, bound2, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < n_end
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + offs_k[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(x, w, input_precision=DOT_PRECISION)

    # Epilogue: one extra dot of depth SR_PAD over this slot's R columns of H (the
    # others are not loaded, so a NaN in another slot's H cannot reach this tile).
    offs_i = tl.arange(0, SR_PAD)
    in_slot = (offs_i // R) == slot
    h = tl.load(
        h_ptr + offs_m[:, None].to(tl.int64) * SR + offs_i[None, :],
        mask=m_ok[:, None] & in_slot[None, :],
        other=0.0,
    )
    sel = in_slot[:, None] & n_ok[None, :]
    b = tl.load(b_ptr + offs_n[None, :] * stride_bn + (offs_i % R)[:, None] * stride_br, mask=sel, other=0.0)
    # fp32 operands (tf32 tensor cores for half inputs): H and B keep 10 mantissa bits
    # instead of bf16's 7, at no visible cost for a 16-deep dot.
    acc += tl.dot(h * scale, b.to(tl.float32), input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# Integer arguments of the backward that the JIT must not specialise (by default an int
# divisible by 16 is compiled with that hint).  With the hint, Triton 3.6 on sm_90 gave
# wrong dX and dA for S·r = 16 on one slot (r = 16) in half precision at the 128×64×64
# tiles, NaN without dropout (H100, bench/gpu_probe.py); without it they are right.
# Both are index arithmetic on tiny tiles, so the hint buys nothing measurable.
BACKWARD_UNSPECIALIZED = ("R", "stride_bn")


@triton.jit(do_not_specialize=BACKWARD_UNSPECIALIZED)
def _lora_backward_kernel(
    dy_ptr, w_ptr, x_ptr, h_ptr, a_ptr, b_ptr, seed_ptr, dx_ptr, part_ptr,
    M, N, K, R, num_slots, adapted, bound1, bound2, scale, threshold, keep_scale,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_xm, stride_xk,
    stride_am, stride_ak, stride_bn, stride_br, stride_dxm, stride_dxk, stride_part,
    HAS_DROPOUT: tl.constexpr, SR_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dX = dY W + keep·Σ_s mask_s ⊙ (dH_s A_s), plus dH, dA and dB partials, in one pass.

    Program (pid_m, pid_k) owns the dX tile [BLOCK_M, BLOCK_K].  Its loop over N
    (the reduction) also accumulates dH for its rows; N-tile t's dB partial for these
    rows is computed by the one program with pid_k == t % num_pid_k, so the dB work is
    spread evenly and each partial is written exactly once (no atomics).  Row pid_m of
    the partials holds this row tile's dA [S·R, K] then its dB [N, R] (``stride_part``
    apart), so one reduction sums both.  Every element is written except, with dropout,
    the dA rows of an absent slot (the host zero-fills the partials only then).
    """
    pid_m, pid_k, num_pid_k = _tile_ids(tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    dt = x_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_i = tl.arange(0, SR_PAD)
    m_ok = offs_m < M
    k_ok = offs_k < K
    SR = num_slots * R
    i_ok = offs_i < SR
    h = tl.load(
        h_ptr + offs_m[:, None].to(tl.int64) * SR + offs_i[None, :],
        mask=m_ok[:, None] & i_ok[None, :],
        other=0.0,
    ).to(dt)
    dy_rows = dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    dh = tl.zeros((BLOCK_M, SR_PAD), dtype=tl.float32)
    for t in range(0, _num_slot_tiles(N, bound1, bound2, BLOCK_N)):
        slot, n0, n_end = _slot_tile(t, N, bound1, bound2, BLOCK_N)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_end
        dy = tl.load(dy_rows + offs_n[None, :] * stride_dyn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(
            w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk,
            mask=n_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        acc += tl.dot(dy, w, input_precision=DOT_PRECISION)
        in_slot = (offs_i // R) == slot
        sel = in_slot[None, :] & n_ok[:, None]
        b_off = offs_n[:, None] * stride_bn + (offs_i % R)[None, :] * stride_br
        b = tl.load(b_ptr + b_off, mask=sel, other=0.0)  # this slot's B_s, [BLOCK_N, SR_PAD]
        # Only this slot's dH columns take the dot: the others would get dY·0, which is
        # NaN wherever dY is not finite.
        dh += tl.where(in_slot[None, :], tl.dot(dy, b.to(dt), input_precision=DOT_PRECISION), 0.0)
        if t % num_pid_k == pid_k:
            db = tl.dot(tl.trans(dy), h, input_precision=DOT_PRECISION) * scale
            db_off = pid_m.to(tl.int64) * stride_part + offs_n[:, None] * R + (offs_i % R)[None, :]
            tl.store(part_ptr + SR * K + db_off, db, mask=sel)
    dh = dh * scale
    dh_lo = dh.to(dt)  # operand of the dA dot, whose other side is the X tile

    # Epilogue: the X tile is read once; each adapted slot regenerates its mask on it.
    x = tl.load(
        x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
        mask=m_ok[:, None] & k_ok[None, :],
        other=0.0,
    )
    a_ptrs = a_ptr + offs_i[:, None] * stride_am + offs_k[None, :] * stride_ak
    da_ptrs = part_ptr + pid_m.to(tl.int64) * stride_part + offs_i[:, None] * K + offs_k[None, :]
    if HAS_DROPOUT:
        h = tile_hash(row_hash(fold_seed(tl.load(seed_ptr)), offs_m), offs_k)
        for s in range(num_slots):
            in_slot = (offs_i >= s * R) & (offs_i < s * R + R)
            if (adapted >> s) & 1:
                a = tl.load(a_ptrs, mask=in_slot[:, None] & k_ok[None, :], other=0.0)
                keep = slot_keep(h, s, threshold)
                # Multiply by the mask, as autograd of x·mask does: NaN stays NaN.
                up = tl.dot(dh, a.to(tl.float32), input_precision=DOT_PRECISION)
                acc += up * (keep.to(tl.float32) * keep_scale)
                da = tl.dot(tl.trans(dh_lo), x * keep.to(dt), input_precision=DOT_PRECISION)
                tl.store(da_ptrs, da * keep_scale, mask=in_slot[:, None] & k_ok[None, :])
    else:
        a = tl.load(a_ptrs, mask=i_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(dh, a.to(tl.float32), input_precision=DOT_PRECISION)
        da = tl.dot(tl.trans(dh_lo), x, input_precision=DOT_PRECISION)
        tl.store(da_ptrs, da, mask=i_ok[:, None] & k_ok[None, :])
    dx_ptrs = dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


# =============================================================================
# 3. Host launchers: configuration, allocation, launch
# =============================================================================


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int  # the output tile width (forward) or the N reduction step (backward)
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


KERNELS = ("shrink", "forward", "backward")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _cdiv(a: int, b: int) -> int:
    # Host arithmetic in plain Python: triton.cdiv is a ConstexprFunction costing ~2 µs
    # a call, several per launch (host time per call, bench/host_path.py).
    return -(-a // b)


def sr_pad(num_slots: int, rank: int) -> int:
    """Adapter width padded to a power of two >= 16: tensor-core dots need K >= 16."""
    return max(16, 1 << (num_slots * rank - 1).bit_length())


def all_sr_pads() -> list[int]:
    return sorted({sr_pad(s, r) for s in range(1, MAX_SLOTS + 1) for r in range(1, MAX_RANK + 1)})


# One launch configuration per (kernel, input precision, padded adapter width), chosen
# from ahead-of-time builds for sm_90 and sm_80 (python -m lora_kernels.aot), not yet
# from GPU timings: the widest tiles that fit A100's 163 KiB of shared memory and, on
# sm_90 in half precision up to SR_PAD 64 (rank 21 on q/k/v), do not spill.  fp32 runs
# exact fp32 dots on the FMA units and wide adapters hold [BLOCK_M, SR_PAD]
# accumulators, so both take small tiles.  bench/NOTES.md lists what still spills.
_T = TileConfig
_CONFIGS: dict[tuple[str, bool, int], TileConfig] = {
    # The shrink is bound by mask hashing and the X read, not by its tiny dot: 32-row
    # tiles give ViT-B/16 (M = 6304) 197 programs, enough for all 132 SMs (64 rows: 99).
    **{("shrink", True, p): _T(32, 0, 64, 4, 3) for p in (16, 32, 64, 128)},
    ("shrink", True, 256): _T(32, 0, 32, 4, 2),
    **{("shrink", False, p): _T(32, 0, 64, 4, 3) for p in (16, 32, 64, 128)},
    ("shrink", False, 256): _T(32, 0, 32, 4, 2),
    **{("forward", True, p): _T(128, 128, 64, 8, 3) for p in (16, 32, 64, 128)},
    ("forward", True, 256): _T(64, 64, 32, 4, 2),
    **{("forward", False, p): _T(128, 64, 32, 8, 3) for p in (16, 32)},
    **{("forward", False, p): _T(64, 64, 32, 4, 2) for p in (64, 128, 256)},
    # Backward: BLOCK_K = 64, not 128: the epilogue holds the dX tile, the X tile, a
    # mask tile and the dH·A tile at once; at 128 wide it spills on sm_90.
    ("backward", True, 16): _T(128, 64, 64, 8, 3),
    # Wider dH/dA tiles (S·R in 17..64) fit without spills only with 64-row tiles.
    **{("backward", True, p): _T(64, 64, 64, 8, 3) for p in (32, 64)},
    **{("backward", True, p): _T(32, 32, 32, 4, 2) for p in (128, 256)},
    # fp32: one stage.  Triton 3.6 pipelines the loop's dY loads into the conditional
    # dB dot wrongly at 2 or 3 stages on sm_90 (dB off by ~100%, every layout; measured
    # on an H100, bench/gpu_probe.py); tf32 dots or one stage are right.
    **{("backward", False, p): _T(32, 32, 32, 4, 1) for p in (16, 32, 64, 128, 256)},
}


def tile_config(kernel: str, dtype: torch.dtype, srp: int) -> TileConfig:
    """The launch configuration for ``kernel`` on ``dtype`` inputs with padded width ``srp``."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    return _CONFIGS[kernel, dtype != torch.float32, srp]


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (like F.linear's default), not tf32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _bounds(slot_bounds: Sequence[int], N: int) -> list[int]:
    inner = list(slot_bounds[:-1])
    return inner + [N] * (MAX_SLOTS - 1 - len(inner))


def _count_slot_tiles(slot_bounds: Sequence[int], block_n: int) -> int:
    # Host twin of the kernels' _num_slot_tiles: each slot is tiled on its own.
    starts = [0, *slot_bounds[:-1]]
    return sum(_cdiv(hi - lo, block_n) for lo, hi in zip(starts, slot_bounds))


_INT32_REACH = 2**31


def _addressable(t: torch.Tensor, wide_dims: tuple[int, ...] = (0,)) -> torch.Tensor:
    """``t`` itself, or a contiguous copy when the kernels' int32 offsets could overflow.

    The kernels take any strides (transposed, sliced, stride 0) and compute the offset
    along ``wide_dims`` in int64, the others in int32 to keep the GEMM loops' address
    arithmetic 32-bit.  Only a layout whose int32 part reaches 2^31 elements (e.g. a
    transposed x of more than 2^31 elements) is copied; contiguous tensors never are.
    """
    if t.numel() < _INT32_REACH and t.is_contiguous():
        return t  # the common case, decided without a Python loop (host time per call)
    reach = sum((n - 1) * st for d, (n, st) in enumerate(zip(t.shape, t.stride())) if d not in wide_dims)
    return t if reach < _INT32_REACH else t.contiguous()


def _operands(x, weight, lora_a, lora_b):
    # Any layout the ops accept (strides are passed); copies only what int32 offsets
    # cannot reach.  The common case (all contiguous) is decided in one expression:
    # x's and W's int32 part spans K columns, which A_cat's S·r·K elements bound.
    if x.is_contiguous() and weight.is_contiguous() and lora_a.is_contiguous() and lora_b.is_contiguous():
        if max(lora_a.numel(), lora_b.numel()) < _INT32_REACH:
            return x, weight, lora_a, lora_b
    return _addressable(x), _addressable(weight), _addressable(lora_a, ()), _addressable(lora_b, ())


class _Launch(NamedTuple):
    """Everything about the three launches that depends only on shapes, dtype and p."""

    shape: tuple[int, int, int, int]  # M, K, N, R
    S: int
    SR: int
    srp: int
    shrink: TileConfig
    forward: TileConfig
    backward: TileConfig
    shrink_grid: tuple[int]
    forward_grid: tuple[int]
    backward_grid: tuple[int]
    backward_rows: int  # row tiles of the backward: rows of the partials
    bound1: int
    bound2: int
    threshold: int
    keep: float
    precision: str
    # A_cat and B_cat have fewer than 2^31 elements: contiguous operands need no copy.
    int32_ok: bool
    # dA and dB as views of the reduced partials
    da_size: tuple[int, int]
    da_stride: tuple[int, int]
    db_size: tuple[int, int]
    db_stride: tuple[int, int]


@functools.lru_cache(maxsize=4096)
def _launch(M: int, K: int, N: int, R: int, slot_bounds: tuple[int, ...], dtype: torch.dtype, p: float) -> _Launch:
    # Cached: a training run repeats a handful of shapes (one per projection and text
    # bucket), and computing this per call was a sizeable part of the host time.
    S = len(slot_bounds)
    srp = sr_pad(S, R)
    shrink, forward, backward = (tile_config(k, dtype, srp) for k in KERNELS)
    b1, b2 = _bounds(slot_bounds, N)
    rows = _cdiv(M, backward.block_m)
    return _Launch(
        shape=(M, K, N, R), S=S, SR=S * R, srp=srp, shrink=shrink, forward=forward, backward=backward,
        shrink_grid=(_cdiv(M, shrink.block_m),),
        forward_grid=(_cdiv(M, forward.block_m) * _count_slot_tiles(slot_bounds, forward.block_n),),
        backward_grid=(rows * _cdiv(K, backward.block_k),),
        backward_rows=rows, bound1=b1, bound2=b2,
        threshold=keep_threshold(p), keep=keep_scale(p), precision=_dot_precision(dtype),
        int32_ok=max(S * R * K, N * R) < _INT32_REACH,
        da_size=(S * R, K), da_stride=(K, 1), db_size=(N, R), db_stride=(R, 1),
    )


def _triton_forward(x, weight, bias, lora_a, lora_b, seed, slot_bounds, adapted, scale, p, L=None):
    """Launches the shrink and the GEMM; ``seed`` is a 0-d int64 tensor (unread without dropout).

    ``x`` is [M, K], or any contiguous [..., K] (its rows read in place; Y comes back in
    its leading shape).  ``L``: the call's :func:`_launch`, when the caller has already
    looked it up."""
    if L is None:
        L = _launch(x.shape[0], x.shape[1], weight.shape[0], lora_b.shape[1], tuple(slot_bounds), x.dtype, p)
    M, K, N, R = L.shape
    y_shape = None if x.dim() == 2 else (*x.shape[:-1], N)
    if (
        L.int32_ok and x.is_contiguous() and weight.is_contiguous() and lora_a.is_contiguous()
        and lora_b.is_contiguous()
    ):  # fmt: skip
        # Strides follow from the shapes (a size-1 dim's stride never moves the address).
        sxm = swn = sam = K
        sbn = R
        sxk = swk = sak = sbr = 1
    else:
        x, weight, lora_a, lora_b = _operands(x if y_shape is None else x.view(M, K), weight, lora_a, lora_b)
        (sxm, sxk), (swn, swk), (sam, sak), (sbn, sbr) = x.stride(), weight.stride(), lora_a.stride(), lora_b.stride()
    # The bias is read with unit stride; it is N values, so a copy costs nothing.
    bias = bias.contiguous() if bias is not None else None
    # new_empty with the sizes as separate arguments: no device to parse, and a size
    # tuple is parsed ~0.5 µs slower.
    h = x.new_empty(M, L.SR, dtype=torch.float32)
    y = x.new_empty(M, N) if y_shape is None else x.new_empty(y_shape)
    cfg = L.shrink
    _lora_shrink_kernel[L.shrink_grid](
        x, lora_a, h, seed,
        M, K, R, L.S, adapted, L.threshold, L.keep,
        sxm, sxk, sam, sak,
        HAS_DROPOUT=p > 0.0, SR_PAD=L.srp, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k,
        DOT_PRECISION=L.precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    cfg = L.forward
    _lora_forward_kernel[L.forward_grid](
        x, weight, bias if bias is not None else x, h, lora_b, y,
        M, N, K, R, L.SR, L.bound1, L.bound2, scale,
        sxm, sxk, swn, swk, sbn, sbr, N, 1,
        HAS_BIAS=bias is not None, SR_PAD=L.srp, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, DOT_PRECISION=L.precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y, h


# Which backward the Triton path runs: "fused", the one-pass kernel above, or "split"
# (lora_kernels/split_backward.py: cuBLAS for dY·W, two Triton passes for the LoRA
# terms).  The one-pass kernel stays the default until a GPU has timed the split one
# (bench/NOTES.md section 10.3: the one-pass kernel took 9× cuBLAS's dY·W on an H200).
BACKWARD_IMPLS = ("fused", "split")
BACKWARD_ENV = "CLIP_LORA_BACKWARD"
# Checked where it is used (the first Triton backward), not here: a bad value at import
# would be a traceback out of `import clip_lora`, before any CLI could report it in a line.
BACKWARD_IMPL = os.environ.get(BACKWARD_ENV, "fused")


def _triton_backward(dy, x, weight, h, lora_a, lora_b, seed, slot_bounds, adapted, scale, p, L=None, flat=False):
    """dX, dA, dB (``flat``: dX, the flat [dA | dB] gradient, None; see :func:`_grads_from_partials`)."""
    if BACKWARD_IMPL != "fused":
        if BACKWARD_IMPL != "split":
            raise ValueError(
                f"fused_lora.BACKWARD_IMPL must be one of {BACKWARD_IMPLS}, got {BACKWARD_IMPL!r}; "
                f"set ${BACKWARD_ENV} to fused or split, or unset it"
            )
        from .split_backward import triton_backward_split

        return triton_backward_split(dy, x, weight, h, lora_a, lora_b, seed, slot_bounds, adapted, scale, p, L, flat)
    if L is None:
        L = _launch(x.shape[0], x.shape[1], weight.shape[0], lora_b.shape[1], tuple(slot_bounds), x.dtype, p)
    M, K, N, R = L.shape
    x_shape = None if x.dim() == 2 else x.shape  # a contiguous [..., K] x (see _triton_forward)
    if (
        L.int32_ok and dy.is_contiguous() and x.is_contiguous() and weight.is_contiguous()
        and lora_a.is_contiguous() and lora_b.is_contiguous()
    ):  # fmt: skip
        sdym = N
        sxm = swn = sam = K
        sbn = R
        sdyn = sxk = swk = sak = sbr = 1
    else:
        if x_shape is not None:
            x, dy = x.view(M, K), dy.reshape(M, N)
        x, weight, lora_a, lora_b = _operands(x, weight, lora_a, lora_b)
        dy = _addressable(dy)
        (sdym, sdyn), (sxm, sxk), (swn, swk) = dy.stride(), x.stride(), weight.stride()
        (sam, sak), (sbn, sbr) = lora_a.stride(), lora_b.stride()
    if not h.is_contiguous():  # read with row stride S·R
        h = h.contiguous()
    dx = x.new_empty(M, K) if x_shape is None else x.new_empty(x_shape)
    # Partials, reduced below by ONE torch.sum in a fixed order (deterministic): row
    # pid_m holds that row tile's dA [S·R, K] and then its dB [N, R]; small
    # (M/BLOCK_M × (S·R·K + N·R) fp32).  The kernel writes every element, except with
    # dropout the dA rows of an absent slot: only then is the buffer zero-filled.
    # (Storing zeros in the kernel instead cost the sm_90 dropout backward 9 registers,
    # leaving it at 255 with no headroom; bench/NOTES.md section 2.)
    srk = L.SR * K
    width = srk + N * R
    # From h (fp32, on the device): no dtype or device arguments to parse.
    alloc = h.new_zeros if p > 0.0 and adapted != (1 << L.S) - 1 else h.new_empty
    part = alloc(L.backward_rows, width)
    cfg = L.backward
    _lora_backward_kernel[L.backward_grid](
        dy, weight, x, h, lora_a, lora_b, seed, dx, part,
        M, N, K, R, L.S, adapted, L.bound1, L.bound2, scale, L.threshold, L.keep,
        sdym, sdyn, swn, swk, sxm, sxk, sam, sak, sbn, sbr, K, 1, width,
        HAS_DROPOUT=p > 0.0, SR_PAD=L.srp, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, DOT_PRECISION=L.precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    da, db = _grads_from_partials(part, L, lora_a, lora_b, flat)
    return dx, da, db


def _grads_from_partials(part, L, lora_a, lora_b, flat=False):
    """dA and dB from the backward's partials (row tile i: its dA [S·R, K], then its dB
    [N, R]): ONE torch.sum in a fixed order (deterministic), then views of it
    (as_strided: one call each instead of slice + view), in the adapters' dtypes.

    ``flat``: the adapters are one flat tensor ``[A_cat | B_cat]`` (see
    :func:`lora_linear_packed`), whose gradient is the sum itself: returns (it, None)."""
    total = part.sum(0)
    if flat:
        return (total if total.dtype == lora_a.dtype else total.to(lora_a.dtype)), None
    da = total.as_strided(L.da_size, L.da_stride, 0)
    db = total.as_strided(L.db_size, L.db_stride, L.da_size[0] * L.da_size[1])
    if da.dtype != lora_a.dtype:
        da = da.to(lora_a.dtype)
    if db.dtype != lora_b.dtype:
        db = db.to(lora_b.dtype)
    return da, db


def _flat_views(ab, shapes):
    """A_cat and B_cat as views of the flat ``[A_cat | B_cat]`` tensor ``ab`` (1-D, any
    stride); ``shapes`` is ``(A_cat's shape, B_cat's shape)``."""
    (a_rows, k), (n, r) = shapes
    st, off = ab.stride(0), ab.storage_offset()
    return (
        ab.as_strided((a_rows, k), (k * st, st), off),
        ab.as_strided((n, r), (r * st, st), off + a_rows * k * st),
    )


# =============================================================================
# 4. torch.library custom ops and autograd
# =============================================================================


@torch.library.custom_op("lora_kernels::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    seed: torch.Tensor,
    slot_bounds: list[int],
    adapted: int,
    scale: float,
    dropout_p: float,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (Y [M, N], H [M, S·R]; H is fp32, or fp64 for fp64 inputs on the torch path).

    Inputs are already validated 2-D tensors (see :func:`lora_linear`)."""
    impl = _triton_forward if use_triton else _torch_forward
    return impl(x, weight, bias, lora_a, lora_b, seed, slot_bounds, adapted, scale, dropout_p)


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, seed, slot_bounds, adapted, scale, dropout_p, use_triton):
    h_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    R = lora_b.shape[1]
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(
        x.shape[0], len(slot_bounds) * R, dtype=h_dtype
    )


@torch.library.custom_op("lora_kernels::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    h: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    seed: torch.Tensor,
    slot_bounds: list[int],
    adapted: int,
    scale: float,
    dropout_p: float,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dX, dA_cat, dB_cat) in the dtypes of x, lora_a and lora_b."""
    impl = _triton_backward if use_triton else _torch_backward
    dx, da, db = impl(dy, x, weight, h, lora_a, lora_b, seed, slot_bounds, adapted, scale, dropout_p)
    if da.untyped_storage().data_ptr() == db.untyped_storage().data_ptr():
        # One reduction leaves dA and dB as views of one buffer; a custom op's outputs
        # may not alias.  Only traced code takes this op, where the copy is in the graph.
        db = db.clone()
    return dx, da, db


@lora_linear_bwd.register_fake
def _(dy, x, weight, h, lora_a, lora_b, seed, slot_bounds, adapted, scale, dropout_p, use_triton):
    # Both backends return fresh contiguous tensors whatever the inputs' strides
    # (empty_like would copy a transposed x's strides and mislead the compiler).
    return x.new_empty(x.shape), lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _setup_context(ctx, inputs, output):
    x, weight, _bias, lora_a, lora_b, seed, slot_bounds, adapted, scale, p, use_triton = inputs
    _y, h = output
    ctx.save_for_backward(x, weight, h, lora_a, lora_b, seed)
    ctx.launch = (slot_bounds, adapted, scale, p, use_triton)
    ctx.mark_non_differentiable(h)


def _backward(ctx, dy, _dh):
    """Chain rule in the module docstring; W, b and the seed get no gradient."""
    x, weight, h, lora_a, lora_b, seed = ctx.saved_tensors
    dx, da, db = lora_linear_bwd(dy.contiguous(), x, weight, h, lora_a, lora_b, seed, *ctx.launch)
    return dx, None, None, da, db, None, None, None, None, None, None


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


class _LoRALinearFunction(torch.autograd.Function):
    """The same forward and backward as the custom ops above, for eager calls.

    Why two doors to one implementation: ``torch.compile`` needs the custom op (an
    opaque node with a fake implementation, no graph break), but in eager mode the
    op's dispatch and ``register_autograd`` wrapper cost more host time per call than
    everything else the layer does (``python -m bench.host_path``, CPU, kernels
    stubbed: one fused forward+backward takes 178 µs through the op and 69 µs through
    this Function, against 37 µs for ``F.linear``;
    bench/results/cpu-host-path-2026-11-26b.json, bench/NOTES.md section 7).  On a GPU
    the projections take tens of microseconds, so eager training would be host-bound.
    Eager calls therefore come here; traced calls take the op (see
    :func:`_lora_linear_core`).  Both run the very same ``_triton_*``/``_torch_*``
    functions, so they agree bit for bit (tested).

    ``torch.library.triton_op`` was the other candidate: it would let Inductor see the
    kernels themselves, but its eager calls go through the same custom-op dispatch, and
    an opaque op that never syncs can already be captured in the compiled step's CUDA
    graphs: on an H100 the compiled ViT-B/16 ImageNet step took 0.48 of the eager one
    (bench/results/NVIDIA-H100-80GB-HBM3-20261126).  What Inductor would gain from
    seeing the kernels themselves is not measured, so the simpler op stays.

    Where the eager call's host time goes (this 2-core CPU, kernels stubbed, timed in
    place over 20k calls).  Before the host-path pass: 92 µs against 35 µs for
    ``F.linear`` (2.6×), ~48 µs over an empty Function with the same tensors: per-call
    checks ~8, ``_lora_linear_core`` ~6 (``device.type`` for the autocast query,
    ``is_compiling``), the Triton host functions ~26 (stride tuples, ``_operands``, a
    second ``_launch`` in the backward, size tuples to ``torch.empty``,
    once_differentiable's no_grad block), the seed draw ~2.5.  Now ~30 µs over it (1.9
    to 2.1× ``F.linear`` over repeated runs; the run-to-run spread is ±0.1): checks ~5
    (one expression; :func:`_check_packed` only on failure), core ~4, forward ~12 and
    backward ~16, most of it torch calls no host path avoids (four allocations, the
    partials' sum 4, its two views 3, three kernel-call argument lists ~2.5 each).  A
    Function making only those torch calls, with no checks and no launches, takes
    ~50 µs: the Python left is ~20 µs.  Modules pass [batch, tokens, K] activations,
    which the Triton path reads in place (:func:`_lora_linear_core`): 1.78× ``F.linear``
    on the same input, where reshaping them cost ~15 µs more (bench/NOTES.md section 7).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, seed, launch):
        # launch: (slot_bounds, adapted, scale, p, L, flat): L the _Launch for Triton, None
        # for torch; flat the shapes of A_cat and B_cat when lora_a is the flat [A | B]
        # tensor (lora_b None), else None.  Views made here, in no-grad mode, are plain
        # tensors: no view node joins the graph, and the flat tensor stays ONE leaf.
        slot_bounds, adapted, scale, p, L, flat = launch
        if flat is not None:
            lora_a, lora_b = _flat_views(lora_a, flat)
        if L is not None:
            y, h = _triton_forward(x, weight, bias, lora_a, lora_b, seed, slot_bounds, adapted, scale, p, L)
        else:
            y, h = _torch_forward(x, weight, bias, lora_a, lora_b, seed, slot_bounds, adapted, scale, p)
        ctx.save_for_backward(x, weight, h, lora_a, lora_b, seed)
        ctx.launch = launch
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            # create_graph=True: the backward is not differentiable, so a second
            # derivative must fail loudly, as once_differentiable makes it.  Otherwise
            # (every training step) the engine already runs this with grad disabled, and
            # once_differentiable's no_grad block would only cost host time.
            return _once_differentiable_backward(ctx, dy)
        x, weight, h, lora_a, lora_b, seed = ctx.saved_tensors
        slot_bounds, adapted, scale, p, L, flat = ctx.launch
        if L is not None:
            # flat: one reduction output is the whole [dA | dB] gradient (no views, one leaf)
            dx, da, db = _triton_backward(
                dy.contiguous(), x, weight, h, lora_a, lora_b, seed, slot_bounds, adapted, scale, p, L, flat is not None
            )
        else:
            dx, da, db = _torch_backward(
                dy.contiguous(), x, weight, h, lora_a, lora_b, seed, slot_bounds, adapted, scale, p
            )
            if flat is not None:
                da, db = torch.cat([da.reshape(-1), db.reshape(-1)]), None
        return dx, None, None, da, db, None, None


@torch.autograd.function.once_differentiable
def _once_differentiable_backward(ctx, dy):
    # Grad mode is off inside, so this runs the plain branch of backward.
    return _LoRALinearFunction.backward(ctx, dy)


# Benchmarks set this to time eager calls through the custom op (bench/host_path.py).
EAGER_VIA_CUSTOM_OP = False


# =============================================================================
# 5. Keyword-only entry point
# =============================================================================


def draw_seed(device: torch.device | str = "cpu") -> torch.Tensor:
    """A dropout seed drawn from torch's generator on ``device`` (so ``torch.manual_seed``
    reproduces a run).  It stays a tensor: no host sync, and torch.compile can trace it."""
    return torch.randint(0, SEED_MAX, (), device=device, dtype=torch.int64)


# os.environ.get raises and catches a KeyError inside when the variable is unset: ~1 µs
# on every call.  The mapping's own dict (what os.environ reads and writes, so the answer
# is the same, monkeypatch.setenv included) answers in a few ns.
_BACKEND_ENV_KEY = os.environ.encodekey(BACKEND_ENV) if hasattr(os.environ, "encodekey") else None


def _backend_env() -> str | None:
    data = getattr(os.environ, "_data", None)
    if data is None or _BACKEND_ENV_KEY is None:
        return os.environ.get(BACKEND_ENV)
    value = data.get(_BACKEND_ENV_KEY)
    return None if value is None else os.environ.decodevalue(value)


# (backend argument, $CLIP_LORA_BACKEND, device) -> use Triton.  The environment is read
# on every call and is part of the key, so changing it between calls changes the backend.
_BACKENDS: dict[tuple[str | None, str | None, torch.device], bool] = {}


def _use_triton(backend: str | None, device: torch.device) -> bool:
    key = (backend, _backend_env(), device)
    try:
        use = _BACKENDS.get(key)
    except TypeError:  # an unhashable backend argument: refused below with the usual message
        use = None
    if use is None:
        use = _resolve_backend(backend or key[1] or "auto", device)
        # Triton on a CPU (the interpreter) also depends on $TRITON_INTERPRET: checked
        # every call, never cached.  Bad values raise above and are never cached either.
        if not use or device.type == "cuda":
            _BACKENDS[key] = use
    return use


def _resolve_backend(backend: str, device: torch.device) -> bool:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r} (also check ${BACKEND_ENV})")
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda"
    if device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got {device.type}; "
                "set TRITON_INTERPRET=1 to run the kernels on CPU through the interpreter"
            )
        check_interpreter_versions()
        patch_bf16_dot()
    return True


def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (fp16, bf16, fp32), got {t.dtype}")


def _check_real(name: str, value) -> float:
    # bool is an int to Python, and a str or tensor would be converted silently (or
    # synchronise the device): take plain real numbers only.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_sizes(slot_sizes) -> list[int]:
    if isinstance(slot_sizes, (str, bytes, torch.Tensor)) or not isinstance(slot_sizes, Sequence):
        raise TypeError(f"slot_sizes must be a list of ints, got {type(slot_sizes).__name__}")
    for n in slot_sizes:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"slot_sizes must be a list of ints, got {list(slot_sizes)!r}")
    return [int(n) for n in slot_sizes]


def _validate(x, weight, bias, lora_a, lora_b, slot_sizes, scale, dropout_p):
    for name, t in (("x", x), ("weight", weight)):
        _check_float(name, t)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must end in the weight's in_features {K}, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)})")
    if bias is not None:
        _check_float("bias", bias)
        if bias.shape != (N,):
            raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    for name, adapters in (("lora_a", lora_a), ("lora_b", lora_b)):
        if isinstance(adapters, torch.Tensor) or not isinstance(adapters, Sequence):
            raise TypeError(f"{name} must be a list with one tensor (or None) per slot, got {type(adapters).__name__}")
    if len(lora_a) != len(lora_b):
        raise ValueError(f"lora_a and lora_b need one entry per slot; got {len(lora_a)} and {len(lora_b)}")
    S = len(lora_a)
    if not 1 <= S <= MAX_SLOTS:
        raise ValueError(f"between 1 and {MAX_SLOTS} slots are supported, got {S}")
    if slot_sizes is None:
        if N % S:
            raise ValueError(f"N={N} does not split into {S} equal slots; pass slot_sizes")
        slot_sizes = [N // S] * S
    slot_sizes = _check_sizes(slot_sizes)
    if len(slot_sizes) != S or any(n <= 0 for n in slot_sizes) or sum(slot_sizes) != N:
        raise ValueError(f"slot_sizes {slot_sizes} must be {S} positive sizes adding up to N={N}")
    ranks = set()
    for s, (a, b) in enumerate(zip(lora_a, lora_b)):
        if (a is None) != (b is None):
            raise ValueError(f"slot {s}: lora_a and lora_b must both be given or both be None")
        if a is None:
            continue
        _check_float(f"lora_a[{s}]", a)
        _check_float(f"lora_b[{s}]", b)
        if a.dim() != 2 or a.shape[1] != K:
            raise ValueError(f"lora_a[{s}] must be [r, {K}], got {tuple(a.shape)}")
        if b.dim() != 2 or b.shape != (slot_sizes[s], a.shape[0]):
            raise ValueError(f"lora_b[{s}] must be [{slot_sizes[s]}, {a.shape[0]}], got {tuple(b.shape)}")
        ranks.add(a.shape[0])
    if not ranks:
        raise ValueError("no slot has an adapter; use torch.nn.functional.linear for a plain projection")
    if len(ranks) > 1:
        raise ValueError(f"all adapters must share one rank, got ranks {sorted(ranks)}")
    R = ranks.pop()
    if not 1 <= R <= MAX_RANK:
        raise ValueError(f"rank must be in 1..{MAX_RANK}, got {R}")
    dropout_p = _check_real("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    scale = _check_real("scale", scale)
    tensors = [x, weight, bias, *lora_a, *lora_b]
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return slot_sizes, R, scale, dropout_p


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    lora_a: Sequence[torch.Tensor | None],
    lora_b: Sequence[torch.Tensor | None],
    scale: float,
    slot_sizes: Sequence[int] | None = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``x Wᵀ + b + scale · (drop_s(x) A_sᵀ) B_sᵀ`` per slot, differentiable in x, A and B.

    Args:
        x: ``[..., K]`` activations (fp16, bf16 or fp32; fp64 on the torch backend).
        weight: frozen ``[N, K]`` weight (``requires_grad=False``); same dtype as x, or
            cast by autocast.
        bias: optional frozen ``[N]`` bias.
        lora_a: per slot, ``A_s [r, K]`` or None (no adapter on that slot).
        lora_b: per slot, ``B_s [N_s, r]`` or None.  A and B may be fp32 master weights
            while x is half precision; their gradients come back in their own dtype.
        scale: the LoRA scale (alpha/sqrt(r) in CLIP-LoRA).
        slot_sizes: the column count of each slot; defaults to an equal split of N.
        dropout_p: LoRA dropout on the adapter input, in [0, 1); realised in steps of
            1/1024 (0.25 exactly), with kept inputs scaled by 1 / P(keep).
        seed: dropout seed: any integer in the int64 range, a Python int or an integer
            tensor of one element (kept on the device); required when ``dropout_p > 0``.
            :func:`~lora_kernels.dropout_mask` regenerates the mask it implies; the
            mapping from seed to mask is in :mod:`lora_kernels.dropout`.
        backend: "auto" (Triton on CUDA, PyTorch on CPU), "triton" or "torch".  The
            ``CLIP_LORA_BACKEND`` environment variable sets the default.
    """
    slot_sizes, R, scale, dropout_p = _validate(x, weight, bias, lora_a, lora_b, slot_sizes, scale, dropout_p)
    if seed is not None:
        seed = check_seed(seed)
    _check_frozen(weight, bias)
    K = weight.shape[1]
    adapted = sum(1 << s for s, a in enumerate(lora_a) if a is not None)
    # Packing the adapters is no compute: autocast must not re-type it (fp16 masters
    # under bf16 autocast crash its cat); the kernels cast A and B themselves.  Modules
    # that call every step keep them packed instead (lora_linear_packed).
    with torch.autocast(x.device.type, enabled=False):
        a_cat = torch.cat([a if a is not None else x.new_zeros(R, K, dtype=_param_dtype(lora_a)) for a in lora_a])
        b_cat = torch.cat(
            [b if b is not None else x.new_zeros(n, R, dtype=_param_dtype(lora_b)) for b, n in zip(lora_b, slot_sizes)]
        )
    bounds = tuple(itertools.accumulate(slot_sizes))
    return _lora_linear_core(x, weight, bias, a_cat, b_cat, seed, bounds, adapted, scale, dropout_p, backend)


@dataclass(frozen=True)
class SlotLayout:
    """The slots of a packed projection, checked once by :func:`slot_layout`.

    ``bounds`` are the slots' end columns; ``adapted`` has bit s set when slot s has an
    adapter.  A module that runs the same projection every step builds this once and
    passes it to :func:`lora_linear_packed` with its packed adapters.
    """

    in_features: int
    slot_sizes: tuple[int, ...]
    rank: int
    adapted: int
    bounds: tuple[int, ...]
    # Derived once here rather than as properties: every call compares shapes with them.
    out_features: int = field(init=False, repr=False, compare=False)
    weight_shape: tuple[int, int] = field(init=False, repr=False, compare=False)
    a_shape: tuple[int, int] = field(init=False, repr=False, compare=False)
    b_shape: tuple[int, int] = field(init=False, repr=False, compare=False)
    bias_shape: tuple[int] = field(init=False, repr=False, compare=False)
    # The flat [A_cat | B_cat] form (lora_linear_packed's lora_ab): its shape, and the
    # shapes of the two views the kernels read.
    ab_shape: tuple[int] = field(init=False, repr=False, compare=False)
    flat_shapes: tuple[tuple[int, int], tuple[int, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.bounds[-1]
        a_shape = (len(self.slot_sizes) * self.rank, self.in_features)
        b_shape = (n, self.rank)
        derived = dict(
            out_features=n,
            weight_shape=(n, self.in_features),
            a_shape=a_shape,
            b_shape=b_shape,
            bias_shape=(n,),
            ab_shape=(a_shape[0] * a_shape[1] + n * self.rank,),
            flat_shapes=(a_shape, b_shape),
        )
        for name, value in derived.items():
            object.__setattr__(self, name, value)


def slot_layout(
    in_features: int, slot_sizes: Sequence[int], rank: int, adapted: Sequence[bool] | None = None
) -> SlotLayout:
    """Check and freeze a packed projection's layout (see :class:`SlotLayout`).

    Args:
        in_features: K, the input width.
        slot_sizes: the output columns of each slot (1 to MAX_SLOTS slots).
        rank: the adapters' rank r (1 to MAX_RANK).
        adapted: per slot, whether it has an adapter (default: all).  The packed A holds
            r rows for every slot and the packed B every output row; an absent slot's
            rows must be zero.
    """
    sizes = _check_sizes(slot_sizes)
    if not 1 <= len(sizes) <= MAX_SLOTS or any(n <= 0 for n in sizes):
        raise ValueError(f"slot_sizes must be 1 to {MAX_SLOTS} positive sizes, got {sizes}")
    for name, value in (("in_features", in_features), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"rank must be in 1..{MAX_RANK}, got {rank}")
    flags = [True] * len(sizes) if adapted is None else [bool(f) for f in adapted]
    if len(flags) != len(sizes) or not any(flags):
        raise ValueError(f"adapted must give one flag per slot ({len(sizes)}) with at least one True, got {adapted}")
    return SlotLayout(
        in_features=int(in_features),
        slot_sizes=tuple(sizes),
        rank=int(rank),
        adapted=sum(1 << s for s, f in enumerate(flags) if f),
        bounds=tuple(itertools.accumulate(sizes)),
    )


def lora_linear_packed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_ab: torch.Tensor | None = None,
    layout: SlotLayout,
    scale: float,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """:func:`lora_linear` with the adapters already packed: the per-step path of a module.

    ``lora_a`` is ``A_cat [S·r, K]`` (slot s in rows ``s·r … s·r+r``) and ``lora_b`` is
    ``B_cat [N, r]`` (slot s in its output rows), kept packed between steps (e.g. as one
    Parameter each), so a call concatenates nothing and autograd has two adapter leaves,
    not 2·S.  Or, instead of both, ``lora_ab``: ONE 1-D tensor of ``layout.ab_shape``,
    A_cat's elements (row-major) followed by B_cat's.  Then autograd has one adapter leaf,
    and its gradient is the backward's reduction output as it stands (no views, one
    AccumulateGrad fewer: the lightest host path, ``python -m bench.host_path``).  The
    layout was checked once by :func:`slot_layout`; each call checks only what can change
    between calls: shapes, dtypes and devices of the tensors.  Other arguments as in
    :func:`lora_linear`.
    """
    if not isinstance(layout, SlotLayout):
        raise TypeError(f"layout must be a SlotLayout from lora_kernels.slot_layout, got {type(layout).__name__}")
    # Checks run every call, so the passing case is one expression; the precise message
    # comes from _check_packed, which runs only when something is wrong.
    try:
        device = x.device
        ok = (
            x.is_floating_point() and weight.is_floating_point()
            and weight.shape == layout.weight_shape and x.shape[-1] == layout.in_features and x.numel() > 0
            and device == weight.device
            and (
                bias is None
                or (bias.is_floating_point() and bias.shape == layout.bias_shape and bias.device == device)
            )
        ) and (
            lora_a is None and lora_b is None
            and lora_ab.is_floating_point() and lora_ab.shape == layout.ab_shape and lora_ab.device == device
            if lora_ab is not None
            else lora_a.is_floating_point() and lora_b.is_floating_point()
            and lora_a.shape == layout.a_shape and lora_b.shape == layout.b_shape
            and lora_a.device == device and lora_b.device == device
        )  # fmt: skip
    except (AttributeError, IndexError):  # not a tensor (None included), or a 0-d x
        ok = False
    if not ok:
        _check_packed(x, weight, bias, lora_a, lora_b, layout, lora_ab)
    if type(scale) is not float or not math.isfinite(scale):
        scale = _check_real("scale", scale)
    if type(dropout_p) is not float:
        dropout_p = _check_real("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if seed is not None and not (type(seed) is torch.Tensor and seed.dtype == torch.int64 and seed.dim() == 0):
        seed = check_seed(seed)  # anything but what draw_seed returns: converted or refused
    if (weight.requires_grad or (bias is not None and bias.requires_grad)) and torch.is_grad_enabled():
        _check_frozen(weight, bias)
    if lora_ab is not None:
        return _lora_linear_core(
            x, weight, bias, lora_ab, None, seed, layout.bounds, layout.adapted, scale, dropout_p, backend,
            layout.flat_shapes,
        )  # fmt: skip
    return _lora_linear_core(
        x, weight, bias, lora_a, lora_b, seed, layout.bounds, layout.adapted, scale, dropout_p, backend
    )


def _check_packed(x, weight, bias, lora_a, lora_b, layout: SlotLayout, lora_ab=None) -> None:
    """The tensor checks of :func:`lora_linear_packed`, one by one: raises the first failure
    with its own message (returns if all pass, which the fast check makes unreachable)."""
    if lora_ab is not None and (lora_a is not None or lora_b is not None):
        raise TypeError("pass the adapters either as lora_a and lora_b or as lora_ab, not both")
    if lora_ab is None and (lora_a is None or lora_b is None):
        raise TypeError("lora_linear_packed needs lora_a and lora_b, or lora_ab (the flat [A_cat | B_cat] tensor)")
    adapters = (("lora_ab", lora_ab),) if lora_ab is not None else (("lora_a", lora_a), ("lora_b", lora_b))
    for name, t in (("x", x), ("weight", weight), *adapters):
        _check_float(name, t)
    N, K = layout.out_features, layout.in_features
    if weight.shape != (N, K):
        raise ValueError(f"weight must be [{N}, {K}] for this layout, got {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must end in the weight's in_features {K}, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)})")
    if lora_ab is not None:
        if lora_ab.shape != layout.ab_shape:
            raise ValueError(
                f"lora_ab must be 1-D with {layout.ab_shape[0]} elements (A_cat {list(layout.a_shape)} then "
                f"B_cat {list(layout.b_shape)}, row-major), got shape {list(lora_ab.shape)}"
            )
    elif lora_a.shape != layout.a_shape or lora_b.shape != layout.b_shape:
        raise ValueError(
            f"packed adapters must be lora_a {list(layout.a_shape)} and lora_b {list(layout.b_shape)}, "
            f"got {list(lora_a.shape)} and {list(lora_b.shape)}"
        )
    device = x.device
    if bias is not None:
        _check_float("bias", bias)
        if bias.shape != (N,):
            raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
        if bias.device != device:
            raise ValueError(f"all tensors must be on one device, got x on {device} and bias on {bias.device}")
    if weight.device != device or any(t.device != device for _, t in adapters):
        where = ", ".join(f"{name} on {t.device}" for name, t in adapters)
        raise ValueError(f"all tensors must be on one device, got x on {device}, weight on {weight.device}, {where}")


def _check_frozen(weight, bias) -> None:
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError(
            "weight and bias must be frozen (requires_grad=False): the fused kernel computes no "
            "gradient for them; call weight.requires_grad_(False)"
        )


_is_compiling = torch.compiler.is_compiling  # bound once: the attribute chain costs per call
# False when no autocast is active on any device; private, so a torch without it always asks.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _lora_linear_core(x, weight, bias, a_cat, b_cat, seed, bounds, adapted, scale, dropout_p, backend, flat=None):
    """Everything after validation, shared by :func:`lora_linear` and :func:`lora_linear_packed`.

    ``flat``: ``(A_cat's shape, B_cat's shape)`` when ``a_cat`` is the flat [A | B]
    tensor and ``b_cat`` is None."""
    if dropout_p > 0.0 and seed is None:
        raise ValueError("seed is required when dropout_p > 0: pass an int or lora_kernels.draw_seed(device)")
    device = x.device
    traced = _is_compiling()
    # Eager calls ask per device only when some autocast is on (one C call otherwise),
    # and name the device without reading device.type, which builds a new string.
    if (traced or _any_autocast()) and torch.is_autocast_enabled(
        "cpu" if x.is_cpu else "cuda" if x.is_cuda else device.type
    ):
        # Same policy as autocast's F.linear: the frozen projection runs in the autocast
        # dtype; the adapters stay fp32 masters and are cast inside the kernels.
        dtype = torch.get_autocast_dtype(device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(
            f"x ({x.dtype}), weight ({weight.dtype}) and bias must share a dtype; cast the frozen "
            "weight or run under torch.autocast"
        )
    use_triton = _use_triton(backend, device)
    if use_triton and x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the Triton kernels take fp16, bf16 or fp32, got {x.dtype}; use backend='torch'")
    if dropout_p == 0.0:
        seed = _unused_seed(device)
    elif isinstance(seed, torch.Tensor):
        if seed.device != device:
            seed = seed.to(device=device)
    else:
        seed = torch.tensor(seed, device=device, dtype=torch.int64)

    N, K = weight.shape
    eager = not (traced or EAGER_VIA_CUSTOM_OP)
    # x's rows as [M, K]: a 2-D x as it is; on the eager Triton path also a contiguous
    # [..., K] x, the usual module call ([batch, tokens, K] activations), whose rows the
    # kernels read in place and whose Y they write in its leading shape.  Anything else is
    # reshaped here (a copy when not viewable), and Y back: in eager mode two more ops and
    # two autograd view nodes per call (python -m bench.host_path, rows "… 3-D").
    in_place = x.dim() == 2 or (eager and use_triton and x.is_contiguous())
    x2 = x if in_place else x.reshape(-1, K)
    if not eager:
        if flat is not None:
            # Differentiable views: autograd (or the compiled graph) sums their gradients
            # into the flat tensor's.
            n = flat[0][0] * flat[0][1]
            a_cat, b_cat = a_cat[:n].view(flat[0]), a_cat[n:].view(flat[1])
        y, _h = lora_linear_fwd(
            x2, weight, bias, a_cat, b_cat, seed, list(bounds), adapted, float(scale), dropout_p, use_triton
        )
    else:
        # The launch constants, looked up once for the forward and the backward.
        R = b_cat.shape[1] if flat is None else flat[1][1]
        L = _launch(x2.numel() // K, K, N, R, bounds, x.dtype, dropout_p) if use_triton else None
        launch = (bounds, adapted, scale, dropout_p, L, flat)  # both entry points made scale a float
        y = _LoRALinearFunction.apply(x2, weight, bias, a_cat, b_cat, seed, launch)
    return y if in_place else y.reshape(*x.shape[:-1], N)


_UNUSED_SEEDS: dict[torch.device, torch.Tensor] = {}


def _unused_seed(device: torch.device) -> torch.Tensor:
    # Without dropout the kernels never read the seed, but the op needs a tensor.  Eager
    # calls reuse one per device (no allocation per eval-mode call); a compiled graph
    # creates its own, which costs nothing there.
    if torch.compiler.is_compiling():
        return torch.zeros((), device=device, dtype=torch.int64)
    if device not in _UNUSED_SEEDS:
        _UNUSED_SEEDS[device] = torch.zeros((), device=device, dtype=torch.int64)
    return _UNUSED_SEEDS[device]


def _param_dtype(params: Sequence[torch.Tensor | None]) -> torch.dtype:
    return next(p.dtype for p in params if p is not None)
