"""Seeded, stateless LoRA-dropout masks.

The mask of adapter slot ``s`` at row ``m`` and input column ``k`` is a pure function of
``(seed, s, m, k)``.  Forward and backward regenerate it, so nothing mask-sized is ever
stored.  The same function exists twice, bit for bit:

* ``keep_mask_tile`` - a ``@triton.jit`` helper the kernels inline;
* :func:`dropout_mask` - a PyTorch mirror used by the CPU path, the tests and users
  who want to see which inputs an adapter dropped.

Why a murmur3-style hash rather than ``tl.rand`` (Philox): the hash needs only 32-bit
multiplies whose low half is kept, so PyTorch reproduces it exactly with int64 tensors,
and its output does not depend on the Triton release (the GPU machines and CI run
different ones).  Per element it costs one ``fmix32`` (two multiplies, three
xor-shifts); the slot and row parts are mixed once per row, not per element.

    key_s   = fmix32(seed ^ fmix32(s + 1))
    row     = fmix32(key_s ^ (m * 0x85EBCA77))
    h(m, k) = fmix32(row ^ (k * 0xC2B2AE3D))
    keep    = (h >> 1) >= round(p * 2^31)   (P(keep) = 1 - p to within 2^-31)

The top 31 bits are compared so the threshold always fits an int32 kernel argument
(one compiled variant for every p).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_U32 = 0xFFFFFFFF
ROW_MULT = 0x85EBCA77
COL_MULT = 0xC2B2AE3D
SEED_MAX = 2**31 - 1  # seeds live in [0, 2^31 - 1) so they fit int32 and int64 alike


def keep_threshold(p: float) -> int:
    """int32 threshold: an element is kept when ``hash >> 1`` is >= this value."""
    return min(int(round(p * 2.0**31)), 2**31 - 1)


# --------------------------------------------------------------------------- Triton


@triton.jit
def _fmix32(h):
    # murmur3 finalizer on uint32; every multiply wraps mod 2^32.
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def slot_row_hash(seed, slot, offs_m):
    """Per-row part of the mask hash of one slot: ``seed`` uint32, ``offs_m`` int rows."""
    key = _fmix32(seed ^ _fmix32(tl.cast(slot + 1, tl.uint32)))
    return _fmix32(key ^ (offs_m.to(tl.uint32) * 0x85EBCA77))


@triton.jit
def keep_mask_tile(row_hash, offs_k, threshold):
    """[BLOCK_M, BLOCK_K] keep-mask from a per-row hash and column offsets."""
    col = offs_k.to(tl.uint32) * 0xC2B2AE3D
    h = _fmix32(row_hash[:, None] ^ col[None, :])
    return (h >> 1).to(tl.int32) >= threshold


# --------------------------------------------------------------------------- PyTorch


def _fmix32_torch(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _U32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _U32
    return h ^ (h >> 16)


def row_hash(seed: int, slot: int, rows: torch.Tensor) -> torch.Tensor:
    """PyTorch mirror of ``slot_row_hash`` (int64 tensors holding uint32 values)."""
    key = _fmix32_torch(torch.tensor(slot + 1, dtype=torch.int64))
    key = _fmix32_torch(key ^ (int(seed) & _U32))
    return _fmix32_torch(key ^ ((rows.to(torch.int64) * ROW_MULT) & _U32))


def dropout_mask(
    seed: int | torch.Tensor,
    slot: int,
    num_rows: int,
    num_cols: int,
    p: float,
    *,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The bool keep-mask ``[num_rows, num_cols]`` that slot ``slot`` uses for ``seed``.

    True means the input element reaches the adapter (and is scaled by 1/(1-p)).
    Bit-identical to what the Triton kernels regenerate.
    """
    if isinstance(seed, torch.Tensor):
        seed = int(seed.item())
    rows = torch.arange(num_rows, device=device, dtype=torch.int64)
    cols = (torch.arange(num_cols, device=device, dtype=torch.int64) * COL_MULT) & _U32
    h = _fmix32_torch(row_hash(seed, slot, rows).to(device)[:, None] ^ cols[None, :])
    return (h >> 1) >= keep_threshold(p)
