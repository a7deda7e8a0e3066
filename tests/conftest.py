"""Test-wide setup.

Without a GPU, the Triton kernels run through Triton's CPU interpreter.  The variable
must be set before any ``@triton.jit`` function is created (i.e. before lora_kernels is
imported), hence here.  With a GPU the same tests run the compiled kernels on CUDA.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
