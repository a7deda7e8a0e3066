"""Test-wide setup.

Without a GPU, the Triton kernels run through Triton's CPU interpreter.  The variable
must be set before any ``@triton.jit`` function is created (i.e. before lora_kernels is
imported), hence here.  With a GPU the same tests run the compiled kernels on CUDA.
"""

import os

import torch

# Tests never download: a default that needs weights (--pretrained openai) fails at once
# instead of waiting on the network.  Set before huggingface_hub is first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
