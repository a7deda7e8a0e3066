"""Every kernel configuration compiles ahead of time for sm_80 and sm_90, without a GPU.

The interpreter does not catch what only the GPU compiler sees (dot shapes below 16,
shared memory over the per-block limit, register spills).  The builds run in
subprocesses without TRITON_INTERPRET (the interpreter replaces @triton.jit functions),
one per architecture so the two cores work in parallel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lora_kernels.aot import launch_specs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Largest dynamic shared memory one block may use: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SMEM_LIMIT = {80: 166912, 90: 232448}


def _build(tmp_path, extra_args: list[str]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    procs = {}
    for arch in (80, 90):
        out = tmp_path / f"sm{arch}.json"
        cmd = [sys.executable, "-m", "lora_kernels.aot", "--arch", str(arch), "--json", str(out), *extra_args]
        procs[arch] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT), out)
    rows = []
    for arch, (proc, out) in procs.items():
        log, _ = proc.communicate()
        assert proc.returncode == 0, f"sm_{arch} build failed:\n{log.decode()[-4000:]}"
        rows += json.loads(out.read_text())
    return rows


def _check(rows: list[dict], expected: list) -> None:
    assert len(rows) == 2 * len(expected), "every configuration must be built for both architectures"
    for r in rows:
        assert r["shared_bytes"] <= SMEM_LIMIT[r["arch"]], f"sm_{r['arch']} {r['name']}: {r['shared_bytes']} B smem"
        if r["arch"] == 90 and r["kernel"] in ("forward", "backward") and r["dtype"] != "fp32":
            # fp32 inputs use exact fp32 dots (FMA units), not tensor cores.
            assert r["wgmma"], f"{r['name']} does not use wgmma on sm_90"
        if r["default"] and r["aligned"]:
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"sm_{r['arch']} {r['name']} spills"


def test_default_configurations_compile(tmp_path):
    # The paper's r=2 configurations (every kernel, dtype, dropout on/off), spill-free.
    # The wider sweeps below take several minutes of the 2-core CI budget: -m slow.
    expected = [s for s in launch_specs() if s.is_default]
    rows = _build(tmp_path, ["--default-only"])
    _check(rows, expected)


@pytest.mark.slow
def test_every_aligned_configuration_compiles(tmp_path):
    expected = [s for s in launch_specs() if s.aligned or s.is_default]
    rows = _build(tmp_path, ["--aligned-or-default"])
    _check(rows, expected)


@pytest.mark.slow
def test_every_configuration_compiles(tmp_path):
    expected = list(launch_specs())
    rows = _build(tmp_path, [])
    _check(rows, expected)
