"""Make the Triton CPU interpreter compute bf16 the way a GPU does.

Triton's interpreter (``TRITON_INTERPRET=1``, used to run the kernels on CPU in tests)
stores bf16 values as raw uint16 (seen with triton 3.8), and three things go wrong:

* ``create_dot`` multiplies those integers, so every bf16 ``tl.dot`` returns garbage.
  bf16 operands are widened to fp32 first; bf16×bf16 products are exact in fp32, so the
  result equals what a tensor-core bf16 dot with fp32 accumulation computes, up to
  summation order.
* Casts to bf16 (``acc.to(tl.bfloat16)``, ``a.to(x.dtype)``) truncate the fp32
  mantissa instead of rounding to nearest even as ``cvt.rn.bf16.f32`` does on the GPU,
  which biases every bf16 result toward zero and roughly doubles its error; casts from
  bf16 to anything but fp32 convert the raw integers.  Casts now go through fp32 and
  round to nearest even (NaN stays NaN).
* Arithmetic and comparisons on bf16 operands (``x * mask``) act on the integers.  They
  now run in fp32 and round the result back to bf16, as the GPU's bf16 instructions do.

Compiled GPU kernels are untouched.
"""

from __future__ import annotations

import numpy as np

_patched = False


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round fp32 to bf16 (nearest, ties to even), as uint16 bit patterns."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    # NaN: keep the sign, force a quiet NaN (rounding could carry it into Inf).
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = np.where(nan, (bits >> 16) | np.uint32(0x0040), rounded)
    return rounded.astype(np.uint16)


def patch_bf16_dot() -> None:
    """Install the bf16 fixes above (idempotent; the name predates the cast fixes)."""
    global _patched
    if _patched:
        return
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    handle_cls = interpreter.TensorHandle

    def is_bf16(handle) -> bool:
        return handle.dtype.scalar == tl.bfloat16

    def widen(handle):
        if is_bf16(handle):
            return handle_cls(bf16_bits_to_f32(handle.data), tl.float32)
        return handle

    original_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    original_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        dst = dst_type.scalar
        if not (is_bf16(src) or dst == tl.bfloat16):
            return original_cast(self, src, dst_type)
        data = bf16_bits_to_f32(src.data) if is_bf16(src) else src.data
        if dst == tl.bfloat16:
            with np.errstate(all="ignore"):
                data = data.astype(np.float32)
            return handle_cls(f32_to_bf16_bits(data), tl.bfloat16)
        return original_cast(self, handle_cls(data, tl.float32), dst_type)

    original_binary = builder.binary_op

    def binary_op(self, lhs, rhs, op):
        if not (is_bf16(lhs) or is_bf16(rhs)):
            return original_binary(self, lhs, rhs, op)
        with np.errstate(all="ignore"):  # overflow to Inf, NaN: what the GPU does, silently
            out = op(widen(lhs).data, widen(rhs).data)
        if out.dtype == np.bool_:
            return handle_cls(out, tl.int1)
        return handle_cls(f32_to_bf16_bits(out), tl.bfloat16)

    original_unary = builder.unary_op

    def unary_op(self, arg, op):
        if not is_bf16(arg):
            return original_unary(self, arg, op)
        with np.errstate(all="ignore"):
            out = op(widen(arg).data)
        return handle_cls(f32_to_bf16_bits(out), tl.bfloat16)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder.binary_op = binary_op
    builder.unary_op = unary_op
    _patched = True
