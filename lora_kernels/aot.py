"""Ahead-of-time compilation of every kernel configuration, without a GPU.

``triton.compile`` with a ``GPUTarget`` builds PTX and a cubin for an NVIDIA GPU that
is not present.  This catches what the CPU interpreter lets through (``tl.dot`` with a
dimension below 16, shared memory over budget, unsupported casts) and, through the
``ptxas`` shipped in the Triton wheel, reports registers and spills.

    python -m lora_kernels.aot --arch 90 [--default-only] [--json out.json]

Every configuration the host launchers can pick is enumerated by :func:`launch_specs`:
kernel × input dtype × adapter dtype × padded adapter width × specialisation flags.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from . import fused_lora as ll
from . import split_backward as sb

_TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_KERNEL_FNS = {
    "shrink": ll._lora_shrink_kernel,
    "forward": ll._lora_forward_kernel,
    "backward": ll._lora_backward_kernel,
    "dy_pass": sb._lora_dy_pass_kernel,
    "dx_pass": sb._lora_dx_pass_kernel,
}
# Pointer arguments and what they point to: the activation dtype, the adapter
# dtype, fp32 workspaces, or the int64 seed.
_ACT_PTRS = {"x_ptr", "w_ptr", "bias_ptr", "y_ptr", "dy_ptr", "dx_ptr"}
_PARAM_PTRS = {"a_ptr", "b_ptr"}
_F32_PTRS = {"h_ptr", "dh_ptr", "part_ptr"}
_FLOAT_ARGS = {"scale", "keep_scale"}
# Contiguous tensors have unit inner strides, which Triton's JIT specialises to the
# constant 1 at launch; the AOT build does the same so it compiles what runs.
_UNIT_STRIDES = {"stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_yn", "stride_dyn", "stride_dxk"}
# The JIT also marks pointers and integers divisible by 16 with a divisibility hint,
# which is what lets loads vectorise and the K loop pipeline through shared memory.
# CLIP's widths (512, 768, 1024 and their multiples) make these divisible; M (batch ×
# tokens) and the rank usually are not.  ``aligned=False`` builds the hint-free variant
# that odd shapes get.
_ALIGNED_INTS = {"N", "K", "bound1", "bound2"}


@dataclass(frozen=True)
class LaunchSpec:
    kernel: str
    dtype: str
    param_dtype: str
    sr_pad: int
    flag: bool  # HAS_DROPOUT (shrink, backward) or HAS_BIAS (forward)
    aligned: bool
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    @property
    def is_default(self) -> bool:
        """The paper's configuration: r=2 on q/k/v (SR_PAD 16), fp32 adapters, half inputs."""
        return self.sr_pad == 16 and self.param_dtype == "fp32" and self.dtype != "fp32"

    @property
    def name(self) -> str:
        flag = {"forward": "bias"}.get(self.kernel, "dropout")
        align = "" if self.aligned else "-unaligned"
        return f"{self.kernel}-{self.dtype}-a{self.param_dtype}-sr{self.sr_pad}-{flag}{int(self.flag)}{align}"


def _config(kernel: str, dtype: torch.dtype, srp: int) -> ll.TileConfig:
    if kernel in sb.SPLIT_KERNELS:
        return sb.split_config(kernel, dtype, srp)
    return ll.tile_config(kernel, dtype, srp)


def launch_specs() -> Iterator[LaunchSpec]:
    # The one-pass kernels, then the split backward's two passes (split_backward.py).
    for kernel in (*ll.KERNELS, *sb.SPLIT_KERNELS):
        flags = (False,) if kernel == "dy_pass" else (False, True)  # the dY pass has no flag
        for dtype in ll.KERNEL_DTYPES:
            # fp32 master adapters (autocast training) or adapters stored in the input dtype.
            for param_dtype in sorted({torch.float32, dtype}, key=str):
                for srp in ll.all_sr_pads():
                    cfg = _config(kernel, dtype, srp)
                    for flag in flags:
                        for aligned in (True, False):
                            yield LaunchSpec(
                                kernel, _TRITON_TYPE[dtype], _TRITON_TYPE[param_dtype], srp, flag, aligned,
                                cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages,
                            )


def _signature_and_constants(spec: LaunchSpec):
    fn = _KERNEL_FNS[spec.kernel]
    consts = {
        "SR_PAD": spec.sr_pad,
        "BLOCK_M": spec.block_m,
        "BLOCK_K": spec.block_k,
        "DOT_PRECISION": "ieee" if spec.dtype == "fp32" else "tf32",
    }
    if spec.kernel != "shrink":
        consts.update(BLOCK_N=spec.block_n, GROUP_M=8)
    consts["HAS_BIAS" if spec.kernel == "forward" else "HAS_DROPOUT"] = spec.flag
    consts.update({n: 1 for n in _UNIT_STRIDES})
    consts = {n: v for n, v in consts.items() if n in fn.arg_names}  # each kernel's own
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in _ACT_PTRS:
            signature[name] = f"*{spec.dtype}"
        elif name in _PARAM_PTRS:
            signature[name] = f"*{spec.param_dtype}"
        elif name in _F32_PTRS:
            signature[name] = "*fp32"
        elif name == "seed_ptr":
            signature[name] = "*i64"
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    hinted = [
        i
        for i, name in enumerate(fn.arg_names)
        if signature[name] != "constexpr"
        and (
            name.endswith("_ptr")
            or (spec.aligned and (name in _ALIGNED_INTS or name.startswith("stride_")))
        )
        # What the JIT leaves unspecialised gets no hint here either.
        and not (spec.kernel == "backward" and name in ll.BACKWARD_UNSPECIALIZED)
    ]
    attrs = {(i,): [["tt.divisibility", 16]] for i in hinted}
    return fn, signature, consts, attrs


def compile_spec(spec: LaunchSpec, arch: int):
    """Compile one configuration for sm_<arch>; returns Triton's compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, consts, attrs = _signature_and_constants(spec)
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(src, target=target, options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and whether the code uses wgmma, from ptxas -v."""
    import triton

    # The ptxas shipped inside the Triton wheel: no CUDA toolkit needed.
    ptxas = os.environ.get("TRITON_PTXAS_PATH") or os.path.join(
        os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"
    )
    sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [ptxas, f"-arch={sm}", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr

    def grab(pattern: str) -> int:
        m = re.search(pattern, out)
        return int(m.group(1)) if m else 0

    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "wgmma": "wgmma" in ptx,
    }


def report(spec: LaunchSpec, arch: int) -> dict:
    compiled = compile_spec(spec, arch)
    row = asdict(spec)
    row.update(name=spec.name, arch=arch, default=spec.is_default, shared_bytes=compiled.metadata.shared)
    row.update(ptxas_report(compiled.asm["ptx"], arch))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", help="SM version(s), e.g. 80 and 90")
    parser.add_argument("--default-only", action="store_true", help="only the paper's r=2 configurations")
    parser.add_argument(
        "--aligned-or-default", action="store_true", help="hint-free variants only for the default configurations"
    )
    parser.add_argument("--json", help="write the per-configuration report here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels that AOT compiles")
    rows = []
    for arch in args.arch or [80, 90]:
        for spec in launch_specs():
            if args.default_only and not spec.is_default:
                continue
            if args.aligned_or_default and not (spec.aligned or spec.is_default):
                continue
            row = report(spec, arch)
            rows.append(row)
            print(
                f"sm_{arch} {row['name']:<40} regs {row['registers']:>3}  smem {row['shared_bytes']:>6}  "
                f"spills {row['spill_stores']}/{row['spill_loads']}  wgmma {row['wgmma']}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
