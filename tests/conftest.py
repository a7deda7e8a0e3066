"""Test-wide setup.

Without a GPU, the Triton kernels run through Triton's CPU interpreter.  The variable
must be set before any ``@triton.jit`` function is created (i.e. before lora_kernels is
imported), hence here.  With a GPU the same tests run the compiled kernels on CUDA.
"""

import os

import pytest
import torch

# Tests never download: a default that needs weights (--pretrained openai) fails at once
# instead of waiting on the network.  Set before huggingface_hub is first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    # Triton < 3.7's interpreter cannot run with numpy >= 2.4 (lora_kernels/_compat.py):
    # a test that reaches the interpreter there is skipped with the fix, not failed.
    # Only that version pair raises InterpreterVersionError; on a GPU it never arises.
    # Imported here: lora_kernels must not load before TRITON_INTERPRET is set above.
    from lora_kernels._compat import InterpreterVersionError

    try:
        return (yield)
    except InterpreterVersionError as err:
        pytest.skip(str(err))
