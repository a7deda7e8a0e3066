"""Seeded, stateless LoRA-dropout masks.

The mask of adapter slot ``s`` at row ``m`` and input column ``k`` is a pure function of
``(seed, s, m, k)``.  Forward and backward regenerate it, so nothing mask-sized is ever
stored.  The same function exists twice, bit for bit:

* ``row_hash`` / ``tile_hash`` / ``slot_keep`` - ``@triton.jit`` helpers the kernels inline;
* :func:`dropout_mask` - a PyTorch mirror used by the CPU path, the tests and users
  who want to see which inputs an adapter dropped.

One 32-bit hash per (row, column) serves all slots: slot ``s`` reads its own 10-bit
field, so a packed q/k/v projection hashes X once instead of three times (the hashing,
not the memory traffic, is what the dropout costs; see bench/NOTES.md).  The fields of
a murmur3 finalizer's output are independent for practical purposes (tested in
tests/test_dropout.py)::

    word     = lo32(seed) ^ (hi32(seed) * 0x9E3779B9)    seed as an int64, two's complement
    key      = fmix32(word)
    row(m)   = fmix32(key ^ (m * 0x85EBCA77))            once per row
    h(m, k)  = fmix32(row(m) ^ (k * 0xC2B2AE3D))         once per element
    keep_s   = ((h >> 10·s) & 1023) >= round(1024 · p)

The seed is any integer in the int64 range, a Python int or an integer tensor of one
element; a seed tensor keeps its value on the device (the kernels fold it themselves).
Every seed in [0, 2^32) and every seed in [-2^31, 2^31) gets its own mask (``word`` is
the seed itself for 0 <= seed < 2^32); two int64 seeds share a mask only when their
words coincide, as 2^64 seeds onto 2^32 words must.

So p is realised in steps of 1/1024 (0.25 exactly), and kept values are scaled by
``1 / P(keep)`` of the realised probability (:func:`keep_scale`), which keeps the
expectation of the dropped input exact for every p.

Why a murmur3-style hash rather than ``tl.rand`` (Philox): it needs only 32-bit
multiplies whose low half is kept, so PyTorch reproduces it exactly with int64 tensors,
and its output does not depend on the Triton release (the GPU machines and CI run
different ones).
"""

from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

_U32 = 0xFFFFFFFF
ROW_MULT = 0x85EBCA77
COL_MULT = 0xC2B2AE3D
FIELD_BITS = 10
FIELD_LEVELS = 1 << FIELD_BITS
MAX_MASK_SLOTS = 32 // FIELD_BITS  # three 10-bit fields per hash
SEED_MAX = 2**31 - 1  # draw_seed draws from [0, SEED_MAX); any int64 seed is accepted
SEED_HIGH_MULT = 0x9E3779B9  # folds the seed's high word in (odd, so each high word permutes)
_INT64 = (-(2**63), 2**63 - 1)
_SEED_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64)


def keep_threshold(p: float) -> int:
    """A slot keeps an element when its 10-bit field is >= this value."""
    return min(int(round(p * FIELD_LEVELS)), FIELD_LEVELS - 1)


def keep_scale(p: float) -> float:
    """1 / P(keep) for the realised keep probability (exactly 1 / (1 - p) when 1024·p is whole)."""
    return FIELD_LEVELS / (FIELD_LEVELS - keep_threshold(p))


def check_seed(seed, name: str = "seed"):
    """``seed`` as a Python int or an int64 tensor of shape (), or a TypeError/ValueError.

    Accepts Python and NumPy integers in the int64 range and integer tensors of one
    element; rejects bools, floats and anything else rather than truncating them.
    A tensor is not read on the host (no device sync).
    """
    if isinstance(seed, torch.Tensor):
        if seed.dtype == torch.int64 and seed.dim() == 0:
            return seed  # what draw_seed returns: nothing to convert (host time per call)
        if seed.dtype not in _SEED_DTYPES:
            raise TypeError(f"{name} tensor must have an integer dtype (int64 or narrower), got {seed.dtype}")
        if seed.numel() != 1:
            raise ValueError(f"{name} tensor must hold exactly one value, got shape {tuple(seed.shape)}")
        return seed.reshape(()).to(torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(seed).__name__} {seed!r}")
    seed = int(seed)
    if not _INT64[0] <= seed <= _INT64[1]:
        raise ValueError(f"{name} must fit in int64 ([-2**63, 2**63 - 1]), got {seed}")
    return seed


def seed_word(seed: int | torch.Tensor) -> int:
    """The 32-bit word a seed is hashed from: ``lo32(seed) ^ (hi32(seed) * 0x9E3779B9)``."""
    seed = check_seed(seed)
    if isinstance(seed, torch.Tensor):
        seed = int(seed.item())
    return ((seed & _U32) ^ (((seed >> 32) & _U32) * SEED_HIGH_MULT)) & _U32


# --------------------------------------------------------------------------- Triton


@triton.jit
def fold_seed(seed):
    """int64 seed -> its uint32 word, as :func:`seed_word` computes on the host.  The
    shift is arithmetic, but the truncation keeps only bits 32..63 of the seed."""
    lo = seed.to(tl.uint32)
    hi = (seed >> 32).to(tl.uint32)
    return lo ^ (hi * 0x9E3779B9)


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
def row_hash(seed, offs_m):
    """Per-row part of the hash: ``seed`` uint32, ``offs_m`` int rows -> uint32 [BLOCK_M]."""
    return _fmix32(_fmix32(seed) ^ (offs_m.to(tl.uint32) * 0x85EBCA77))


@triton.jit
def tile_hash(row_h, offs_k):
    """uint32 [BLOCK_M, BLOCK_K] hash shared by every slot's mask."""
    col = offs_k.to(tl.uint32) * 0xC2B2AE3D
    return _fmix32(row_h[:, None] ^ col[None, :])


@triton.jit
def slot_keep(h, slot, threshold):
    """Keep-mask of ``slot``: its 10-bit field of the tile hash against the threshold."""
    return ((h >> tl.cast(slot * 10, tl.uint32)) & 1023).to(tl.int32) >= threshold


# --------------------------------------------------------------------------- PyTorch


def _fmix32_torch(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _U32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _U32
    return h ^ (h >> 16)


def mask_hash(
    seed: int | torch.Tensor, num_rows: int, num_cols: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The [num_rows, num_cols] hash (int64 holding uint32) that every slot's mask reads."""
    if isinstance(seed, torch.Tensor):
        # On the device, as fold_seed does in the kernels: no host read of the seed (a
        # sync on a GPU, and a stop for CUDA graphs).  Products wrap mod 2^64, and only
        # their low 32 bits are kept, as in _fmix32_torch.
        s = check_seed(seed).to(device=device)
        word = ((s & _U32) ^ ((((s >> 32) & _U32) * SEED_HIGH_MULT) & _U32)) & _U32
    else:
        word = torch.tensor(seed_word(seed), dtype=torch.int64, device=device)
    key = _fmix32_torch(word)
    rows = torch.arange(num_rows, device=device, dtype=torch.int64)
    row = _fmix32_torch(key ^ ((rows * ROW_MULT) & _U32))
    cols = (torch.arange(num_cols, device=device, dtype=torch.int64) * COL_MULT) & _U32
    return _fmix32_torch(row[:, None] ^ cols[None, :])


def keep_from_hash(h: torch.Tensor, slot: int, p: float) -> torch.Tensor:
    return ((h >> (FIELD_BITS * slot)) & (FIELD_LEVELS - 1)) >= keep_threshold(p)


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

    True means the input element reaches the adapter (and is scaled by ``keep_scale(p)``).
    Bit-identical to what the Triton kernels regenerate.
    """
    if not 0 <= slot < MAX_MASK_SLOTS:
        raise ValueError(f"slot must be in 0..{MAX_MASK_SLOTS - 1}, got {slot}")
    return keep_from_hash(mask_hash(seed, num_rows, num_cols, device), slot, p)
