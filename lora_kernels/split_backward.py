"""The fused layer's backward in three passes: cuBLAS for dY·W, two Triton passes for LoRA.

Same math and outputs as ``_lora_backward_kernel`` in :mod:`.fused_lora` (its docstring
has the formulas), split where the work is different in kind:

    dX  = dY W                      torch.mm (cuBLAS): the GEMM, as the frozen layer runs it
    dY pass   one program per row tile reads its dY rows once:
              dH = scale · dY B  (each column tile against its own slot's B)
              and the dB partials scale · dY_tileᵀ H for every column tile
    X pass    one program per (row tile, K tile) reads X and dX once:
              dX += keep · Σ_s mask_s ⊙ (dH_s A_s), the dA partials keep · dH_sᵀ (mask_s ⊙ X)
    reduction the dA and dB partials (one torch.sum, in a fixed order, as the one-pass
              backward: the partial layout is the same)

Why: on an H200 (bench/NOTES.md section 10.3) the one-pass backward kernel took 281 µs
at the ViT-B/16 q/k/v shape where cuBLAS computes the same dY·W in 31 µs; the LoRA
passes move ~40 MB (dY, X and dX once each) and should take ~20 µs more.  The cost: dX
is written twice (cuBLAS, then the X pass) and there are two launches more per call,
which an eager step pays in host time and a CUDA-graphed (``--compile``) step does not.

Not measured on a GPU yet, so it is off by default: ``fused_lora.BACKWARD_IMPL =
"split"`` (or ``CLIP_LORA_BACKWARD=split`` in the environment at import) selects it;
the benchmarks' ``fused+split`` layer provider times it beside the one-pass kernel.
The X pass repeats the one-pass kernel's epilogue rather than sharing a helper with it:
that kernel's code is what the Triton 3.6 miscompile fixes were verified on
(bench/NOTES.md section 2), and it stays as it was measured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import fused_lora as ll
from .dropout import fold_seed, row_hash, slot_keep, tile_hash
from .fused_lora import _num_slot_tiles, _slot_tile, _tile_ids

SPLIT_KERNELS = ("dy_pass", "dx_pass")


@triton.jit
def _lora_dy_pass_kernel(
    dy_ptr, b_ptr, h_ptr, dh_ptr, part_ptr,
    M, N, K, R, num_slots, bound1, bound2, scale,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_part,
    SR_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dH [M, S·R] = scale · dY B per slot, and the dB partials of this row tile.

    Row tile pid_m's partials row holds its dB [N, R] after the dA block (S·R·K values),
    as in the one-pass backward, so one reduction sums both."""
    pid_m = tl.program_id(0)
    dt = dy_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = tl.arange(0, SR_PAD)
    m_ok = offs_m < M
    SR = num_slots * R
    i_ok = offs_i < SR
    h = tl.load(
        h_ptr + offs_m[:, None].to(tl.int64) * SR + offs_i[None, :],
        mask=m_ok[:, None] & i_ok[None, :],
        other=0.0,
    ).to(dt)
    dy_rows = dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym
    dh = tl.zeros((BLOCK_M, SR_PAD), dtype=tl.float32)
    for t in range(0, _num_slot_tiles(N, bound1, bound2, BLOCK_N)):
        slot, n0, n_end = _slot_tile(t, N, bound1, bound2, BLOCK_N)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_end
        dy = tl.load(dy_rows + offs_n[None, :] * stride_dyn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        in_slot = (offs_i // R) == slot
        sel = in_slot[None, :] & n_ok[:, None]
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + (offs_i % R)[None, :] * stride_br, mask=sel, other=0.0)
        # Only this slot's dH columns take the dot: the others would get dY·0, NaN
        # wherever dY is not finite (as in the one-pass kernel).
        dh += tl.where(in_slot[None, :], tl.dot(dy, b.to(dt), input_precision=DOT_PRECISION), 0.0)
        db = tl.dot(tl.trans(dy), h, input_precision=DOT_PRECISION) * scale
        db_off = pid_m.to(tl.int64) * stride_part + offs_n[:, None] * R + (offs_i % R)[None, :]
        tl.store(part_ptr + SR * K + db_off, db, mask=sel)
    tl.store(
        dh_ptr + offs_m[:, None].to(tl.int64) * SR + offs_i[None, :],
        dh * scale,
        mask=m_ok[:, None] & i_ok[None, :],
    )


@triton.jit
def _lora_dx_pass_kernel(
    x_ptr, a_ptr, dh_ptr, seed_ptr, dx_ptr, part_ptr,
    M, K, R, num_slots, adapted, threshold, keep_scale,
    stride_xm, stride_xk, stride_am, stride_ak, stride_dxm, stride_dxk, stride_part,
    HAS_DROPOUT: tl.constexpr, SR_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dX += keep · Σ_s mask_s ⊙ (dH_s A_s) in place, and this tile's dA partials.

    dX holds dY·W (cuBLAS) on entry; the sum is formed in fp32 and rounded once more.
    Every dA element of an adapted slot is written; with dropout an absent slot's rows
    are not (the host zero-fills the partials only then, as for the one-pass kernel)."""
    pid_m, pid_k, _ = _tile_ids(tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    dt = x_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_i = tl.arange(0, SR_PAD)
    m_ok = offs_m < M
    k_ok = offs_k < K
    SR = num_slots * R
    i_ok = offs_i < SR
    dh = tl.load(
        dh_ptr + offs_m[:, None].to(tl.int64) * SR + offs_i[None, :],
        mask=m_ok[:, None] & i_ok[None, :],
        other=0.0,
    )
    dh_lo = dh.to(dt)  # operand of the dA dot, whose other side is the X tile
    tile = m_ok[:, None] & k_ok[None, :]
    dx_ptrs = dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :] * stride_dxk
    acc = tl.load(dx_ptrs, mask=tile, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk, mask=tile, other=0.0)
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
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=tile)


# One row tile for both passes (they share the partials' rows); the dY pass steps N by
# block_n, the X pass tiles K by block_k.  Chosen from ahead-of-time builds (sm_90,
# sm_80; python -m lora_kernels.aot), not from GPU timings: 64-row tiles give ViT-B/16
# (M = 6304) 99 dY programs, each streaming its 64 rows of dY once; the X pass with
# dropout holds the dX, X, hash and dH·A tiles at once, and at 4 warps it spilled on
# sm_90 (255 registers), so it takes 8.  Wide adapters hold [BLOCK_M, SR_PAD] fp32
# accumulators, so they take fewer rows.  fp32: one stage, as for the one-pass backward
# (Triton 3.6 mis-pipelined its fp32 loop at 2-3 stages on sm_90).
_T = ll.TileConfig
_CONFIGS: dict[tuple[str, bool, int], ll.TileConfig] = {
    **{("dy_pass", True, p): _T(64, 64, 0, 4, 3) for p in (16, 32, 64)},
    **{("dx_pass", True, p): _T(64, 0, 64, 8, 1) for p in (16, 32, 64)},
    ("dy_pass", True, 128): _T(32, 32, 0, 4, 2),
    ("dx_pass", True, 128): _T(32, 0, 32, 4, 1),
    ("dy_pass", True, 256): _T(16, 32, 0, 4, 2),
    ("dx_pass", True, 256): _T(16, 0, 32, 4, 1),
    **{("dy_pass", False, p): _T(32, 32, 0, 4, 1) for p in (16, 32, 64, 128, 256)},
    **{("dx_pass", False, p): _T(32, 0, 32, 4, 1) for p in (16, 32, 64, 128, 256)},
}


def split_config(kernel: str, dtype: torch.dtype, srp: int) -> ll.TileConfig:
    """The launch configuration of one split pass (``dy_pass`` or ``dx_pass``) for
    ``dtype`` inputs and padded adapter width ``srp``."""
    if kernel not in SPLIT_KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {SPLIT_KERNELS}")
    return _CONFIGS[kernel, dtype != torch.float32, srp]


def triton_backward_split(dy, x, weight, h, lora_a, lora_b, seed, slot_bounds, adapted, scale, p, L=None, flat=False):
    """dX, dA, dB as ``fused_lora._triton_backward`` returns them (``flat`` included), in three passes.

    ``L``: the call's ``fused_lora._launch``, when the caller has already looked it up."""
    if L is None:
        L = ll._launch(x.shape[0], x.shape[1], weight.shape[0], lora_b.shape[1], tuple(slot_bounds), x.dtype, p)
    M, K, N, R = L.shape
    dy_cfg, dx_cfg = (split_config(k, x.dtype, L.srp) for k in SPLIT_KERNELS)
    x_shape = None if x.dim() == 2 else x.shape  # a contiguous [..., K] x: dX goes back in its shape
    if x_shape is not None:
        x, dy = x.view(M, K), dy.reshape(M, N)
    x, weight, lora_a, lora_b = ll._operands(x, weight, lora_a, lora_b)
    dy = ll._addressable(dy)
    h = h.contiguous()  # read with row stride S·R
    dx = torch.mm(dy, weight)  # [M, K], contiguous: the X pass adds the LoRA term in place
    rows = ll._cdiv(M, dy_cfg.block_m)  # == dx_cfg.block_m
    width = L.SR * K + N * R  # a partials row: dA [S·R, K], then dB [N, R]
    # Every partial is written except, with dropout, an absent slot's dA rows.
    alloc = torch.zeros if p > 0.0 and adapted != (1 << L.S) - 1 else torch.empty
    part = alloc((rows, width), device=x.device, dtype=torch.float32)
    dh = torch.empty((M, L.SR), device=x.device, dtype=torch.float32)
    sdy, sb = dy.stride(), lora_b.stride()
    _lora_dy_pass_kernel[(rows,)](
        dy, lora_b, h, dh, part,
        M, N, K, R, L.S, L.bound1, L.bound2, scale,
        sdy[0], sdy[1], sb[0], sb[1], width,
        SR_PAD=L.srp, BLOCK_M=dy_cfg.block_m, BLOCK_N=dy_cfg.block_n, DOT_PRECISION=L.precision,
        num_warps=dy_cfg.num_warps, num_stages=dy_cfg.num_stages,
    )  # fmt: skip
    sx, sa = x.stride(), lora_a.stride()
    _lora_dx_pass_kernel[(rows * ll._cdiv(K, dx_cfg.block_k),)](
        x, lora_a, dh, seed, dx, part,
        M, K, R, L.S, adapted, L.threshold, L.keep,
        sx[0], sx[1], sa[0], sa[1], K, 1, width,
        HAS_DROPOUT=p > 0.0, SR_PAD=L.srp, BLOCK_M=dx_cfg.block_m, BLOCK_K=dx_cfg.block_k,
        GROUP_M=dx_cfg.group_m, DOT_PRECISION=L.precision,
        num_warps=dx_cfg.num_warps, num_stages=dx_cfg.num_stages,
    )  # fmt: skip
    da, db = ll._grads_from_partials(part, L, lora_a, lora_b, flat)
    return (dx if x_shape is None else dx.view(x_shape)), da, db
