"""The guard for Triton's interpreter with numpy >= 2.4 (lora_kernels/_compat.py)."""

from __future__ import annotations

import numpy
import pytest
import torch
import triton
from kernel_cases import make_case

from lora_kernels import lora_linear
from lora_kernels._compat import (
    NUMPY_FIX,
    InterpreterVersionError,
    check_interpreter_versions,
    interpreter_problem,
)


@pytest.mark.parametrize(
    "triton_version,numpy_version",
    [("3.6.0", "2.5.2"), ("3.6.0", "2.4.0"), ("3.5.1", "2.4.0rc1"), ("3.6.0+git1a2b3c", "2.10.0")],
)
def test_broken_pairs_name_the_fix(triton_version, numpy_version):
    problem = interpreter_problem(triton_version, numpy_version)
    assert problem is not None
    assert NUMPY_FIX in problem and triton_version in problem and numpy_version in problem


@pytest.mark.parametrize(
    "triton_version,numpy_version",
    # 3.10 and 2.10 compare as numbers, not strings (as strings "3.10" < "3.7").
    [("3.6.0", "2.3.5"), ("3.7.0", "2.5.2"), ("3.8.0", "2.4.6"), ("3.10.0", "2.10.0"), ("3.6.0", "1.26.4")],
)
def test_working_pairs_pass(triton_version, numpy_version):
    assert interpreter_problem(triton_version, numpy_version) is None


def test_unreadable_version_is_an_error():
    with pytest.raises(ValueError, match="version number"):
        interpreter_problem("nightly", "2.5.0")


def test_interpreter_launch_with_the_broken_pair_raises_before_running(monkeypatch):
    """lora_linear on the interpreter stops with the fix named (a deep TypeError before the guard)."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the kernels are compiled, the interpreter is not used")
    case = make_case(20, 24, [16], 2, [True], torch.float32, device="cpu")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.5.2")
    with pytest.raises(InterpreterVersionError, match=r'pip install "numpy<2\.4"'):
        lora_linear(
            case.x, case.weight, case.bias, lora_a=case.lora_a, lora_b=case.lora_b, scale=case.scale,
            slot_sizes=case.slot_sizes, dropout_p=0.25, seed=1, backend="triton",
        )  # fmt: skip
    # The same call on the PyTorch path is unaffected by the pair.
    y = lora_linear(
        case.x, case.weight, case.bias, lora_a=case.lora_a, lora_b=case.lora_b, scale=case.scale,
        slot_sizes=case.slot_sizes, dropout_p=0.25, seed=1, backend="torch",
    )  # fmt: skip
    assert torch.isfinite(y).all()


def test_check_raises_exactly_when_there_is_a_problem(monkeypatch):
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    check_interpreter_versions()
    monkeypatch.setattr(numpy, "__version__", "2.4.0")
    with pytest.raises(InterpreterVersionError, match="numpy 2.4.0"):
        check_interpreter_versions()


def test_conftest_turns_the_guard_into_a_skip_and_nothing_else():
    import conftest

    hook = conftest.pytest_runtest_call(item=None)
    next(hook)
    with pytest.raises(pytest.skip.Exception, match=r'pip install "numpy<2\.4"'):
        hook.throw(InterpreterVersionError(interpreter_problem("3.6.0", "2.5.2")))

    hook = conftest.pytest_runtest_call(item=None)
    next(hook)
    with pytest.raises(ValueError, match="other"):
        hook.throw(ValueError("other"))
