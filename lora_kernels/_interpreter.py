"""Make the Triton CPU interpreter compute bf16 dots correctly.

Triton's interpreter (``TRITON_INTERPRET=1``, used to run the kernels on CPU in tests)
stores bf16 values as raw uint16 and its ``create_dot`` multiplies those integers, so
every bf16 ``tl.dot`` returns garbage (seen with triton 3.8).  The patch widens bf16
operands to fp32 first; bf16×bf16 products are exact in fp32, so the result equals what
a tensor-core bf16 dot with fp32 accumulation computes, up to summation order.
Compiled GPU kernels are untouched.
"""

from __future__ import annotations

import numpy as np

_patched = False


def patch_bf16_dot() -> None:
    global _patched
    if _patched:
        return
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype.scalar == tl.bfloat16:
            data = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot
    _patched = True
