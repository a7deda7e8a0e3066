"""Version pairs that are known not to work together, caught with a message that names the fix.

Triton's CPU interpreter (``TRITON_INTERPRET=1``) before 3.7 converts one-element
arrays to ints with ``int(array)``, which numpy 2.4 turned into an error: every kernel
launch that indexes with a scalar tensor then dies deep in ``triton/runtime/interpreter.py``
with ``TypeError: only 0-dimensional arrays can be converted to Python scalars``
(triton-lang/triton#9171; the 3.7.0 and 3.8.0 wheels squeeze the array first).  Compiled GPU kernels
never go through that code, so the pair is only a problem for the interpreter: torch
2.11's triton 3.6 with numpy 2.5 runs the kernels fine on a GPU.

setup.py cannot pin this (an environment marker cannot name another package's
version), so the interpreter path checks it before the first launch instead.
"""

from __future__ import annotations

import re

NUMPY_FIX = 'pip install "numpy<2.4"'
FIRST_FIXED_TRITON = (3, 7)
FIRST_BREAKING_NUMPY = (2, 4)


class InterpreterVersionError(RuntimeError):
    """Triton's interpreter cannot run with the installed numpy (see :func:`interpreter_problem`)."""


def _release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``3.6.0``, ``2.5.0rc1`` or ``3.8.0+git1a2b``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot read a version number from {version!r}")
    return int(match.group(1)), int(match.group(2))


def interpreter_problem(triton_version: str | None = None, numpy_version: str | None = None) -> str | None:
    """Why Triton's interpreter cannot run the kernels with these versions, or None.

    Defaults to the installed triton and numpy.
    """
    if triton_version is None:
        import triton

        triton_version = triton.__version__
    if numpy_version is None:
        import numpy

        numpy_version = numpy.__version__
    if _release(triton_version) < FIRST_FIXED_TRITON and _release(numpy_version) >= FIRST_BREAKING_NUMPY:
        return (
            f"Triton {triton_version}'s CPU interpreter (TRITON_INTERPRET=1) does not work with numpy "
            f"{numpy_version} (int() of a one-element array fails since numpy 2.4; fixed in triton 3.7): "
            f'run `{NUMPY_FIX}`, or use backend="torch" on CPU'
        )
    return None


def check_interpreter_versions() -> None:
    """Raise :class:`InterpreterVersionError` naming the fix when the interpreter cannot run."""
    problem = interpreter_problem()
    if problem is not None:
        raise InterpreterVersionError(problem)
