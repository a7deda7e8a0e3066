"""Which launch settings give a kernel's wrong answer on a GPU: a short diagnostic.

The first CUDA run (2026-11-26, H100, triton 3.6) failed stage 1: fp32 dA/dB off by
~100% (every layout), and dx in fp16/bf16 at rank 16 on one slot with dropout.  The
interpreter runs the same kernels right, so the suspects are the compiled code's
settings.  This runs each failing case under variants of its tile configuration and dot
precision, three times each (an error that moves between runs is a race), and prints the
relative error of every output against the fp64 reference.  "base" is the shipped
configuration, so since the fixes (fp32 backward at one stage, the backward compiled
without the divisibility hint on R) it is the fixed kernel, and the variants show what
else would break it.

    python -m bench.gpu_probe [--out DIR]      # on the GPU machine, ~1 minute
    # one process per run (an illegal access cannot poison the next), the second probe:
    xargs -P 6 -L 1 python -m bench.gpu_probe one < bench/gpu_probe_runs.txt   # PYTHONPATH=.:tests
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from kernel_cases import make_case, rel_err, run_fused, run_reference  # noqa: E402

import lora_kernels.fused_lora as fl  # noqa: E402

T = fl.TileConfig

# (name, M, K, slot sizes, rank, adapted, dtype, p, config key, variants)
FP32_VARIANTS = {
    "base": None,
    "stages1": T(32, 32, 32, 4, 1),
    "stages3": T(32, 32, 32, 4, 3),
    "warps8": T(32, 32, 32, 8, 2),
    "warps2": T(32, 32, 32, 2, 2),
    "block64": T(64, 64, 32, 4, 2),
    "bn64": T(32, 64, 32, 4, 2),
    "group1": T(32, 32, 32, 4, 2, 1),
}
HALF_VARIANTS = {
    "base": None,
    "stages2": T(128, 64, 64, 8, 2),
    "stages1": T(128, 64, 64, 8, 1),
    "warps4": T(128, 64, 64, 4, 3),
    "bm64": T(64, 64, 64, 8, 3),
    "bm32": T(32, 32, 32, 4, 2),
}
CASES = [
    ("fp32-qkv-r2-p0", 150, 150, [67, 67, 67], 2, [True, True, True], torch.float32, 0.0, FP32_VARIANTS),
    ("fp32-single-r2-p0.25", 150, 150, [201], 2, [True], torch.float32, 0.25, FP32_VARIANTS),
    ("fp16-single-r16-p0.25", 150, 150, [201], 16, [True], torch.float16, 0.25, HALF_VARIANTS),
    ("bf16-single-r16-p0.25", 150, 150, [201], 16, [True], torch.bfloat16, 0.25, HALF_VARIANTS),
    ("fp16-single-r16-p0", 150, 150, [201], 16, [True], torch.float16, 0.0, HALF_VARIANTS),
    ("fp16-single-r8-p0.25", 150, 150, [201], 8, [True], torch.float16, 0.25, HALF_VARIANTS),
]
PRECISIONS = ("default", "ieee", "tf32")


def run_case(name, M, K, sizes, rank, adapted, dtype, p, variants, device="cuda") -> list[dict]:
    case = make_case(M, K, sizes, rank, adapted, dtype, bias=True, device=device, seed=3)
    ref = run_reference(case, p=p, seed=11)
    srp = fl.sr_pad(len(sizes), rank)
    key = ("backward", dtype != torch.float32, srp)
    base_cfg = fl._CONFIGS[key]
    base_prec = fl._dot_precision
    rows = []
    for vname, cfg in variants.items():
        for prec in PRECISIONS:
            if prec != "default" and vname != "base":
                continue  # precision variants on the base tiles only
            fl._CONFIGS[key] = cfg or base_cfg
            fl._dot_precision = base_prec if prec == "default" else (lambda dt, prec=prec: prec)
            fl._launch.cache_clear()
            errs = []
            try:
                for _ in range(3):
                    got = run_fused(case, p=p, seed=11, backend="triton")
                    errs.append([rel_err(g, r) for g, r in zip(got, ref)])
                row = {"case": name, "variant": vname, "precision": prec, "config": dataclasses.asdict(cfg or base_cfg)}
                row["rel_err"] = errs
            except Exception as err:  # a variant that does not compile is a finding too
                row = {"case": name, "variant": vname, "precision": prec, "error": f"{type(err).__name__}: {err}"[:300]}
            finally:
                fl._CONFIGS[key] = base_cfg
                fl._dot_precision = base_prec
                fl._launch.cache_clear()
            rows.append(row)
            worst = "ERR " + row["error"][:60] if "error" in row else " ".join(f"{max(e):.1e}" for e in zip(*errs))
            moving = "" if "error" in row else (" MOVES" if len({tuple(e) for e in errs}) > 1 else "")
            print(f"{name:<24} {vname:<8} {prec:<7} {worst}{moving}", flush=True)
    return rows


def db_pattern(device="cuda", dtype=torch.float32) -> dict:
    """Where the wrong dB rows of the fp32 qkv case sit (N tiles of 32, K tiles of 32)."""
    case = make_case(150, 150, [67, 67, 67], 2, [True, True, True], dtype, device=device, seed=3)
    got = run_fused(case, p=0.0, seed=11, backend="triton")
    ref = run_reference(case, p=0.0, seed=11)
    out = {}
    for i in range(5, 8):  # dB_q, dB_k, dB_v
        diff = (got[i].double() - ref[i]).abs().amax(dim=1)
        scale = ref[i].abs().amax()
        bad = (diff > 1e-4 * scale).nonzero().flatten().tolist()
        ratio = (got[i].double().norm() / ref[i].norm()).item()
        out[f"dB{i - 5}"] = {"bad_rows": bad, "norm_ratio": ratio}
    print("dB pattern:", json.dumps(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["one"]:
        one(argv[1:])
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--cpu-check", action="store_true", help="one case, base only, through the interpreter")
    args = ap.parse_args(argv)
    import triton

    device = "cpu" if args.cpu_check else "cuda"
    cases = [(*CASES[0][:-1], {"base": None})] if args.cpu_check else CASES
    t0 = time.time()
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    info = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__}
    print(info, flush=True)
    rows = []
    try:
        info["db_pattern"] = db_pattern(device)
    except Exception as err:
        info["db_pattern"] = f"{type(err).__name__}: {err}"
    for c in cases:
        rows += run_case(*c, device=device)
    info["rows"] = rows
    info["seconds"] = time.time() - t0
    Path(args.out, "probe.json").write_text(json.dumps(info, indent=1))
    return 0


# --- second probe: the half-precision backward at S·r = SR_PAD (one process per run, so
# an illegal access cannot poison the next) ----------------------------------------------
def one(args: list[str]) -> None:
    """``R S p dtype variant``: rel errors of one run, printed on one line."""
    import triton

    R, S, p, dtype, variant = int(args[0]), int(args[1]), float(args[2]), getattr(torch, args[3]), args[4]
    sizes = [201] if S == 1 else [67, 67, 67][:S]
    srp = fl.sr_pad(S, R)
    key = ("backward", dtype != torch.float32, srp)
    cfg = fl._CONFIGS[key]
    if variant == "nospec":  # R and the B strides not specialised (divisibility by 16)
        fl._lora_backward_kernel = triton.jit(fl._lora_backward_kernel.fn, do_not_specialize=["R", "stride_bn"])
    elif variant == "nospec_fwd":
        fl._lora_forward_kernel = triton.jit(fl._lora_forward_kernel.fn, do_not_specialize=["R", "stride_bn"])
        fl._lora_shrink_kernel = triton.jit(fl._lora_shrink_kernel.fn, do_not_specialize=["R"])
    elif variant != "base":
        fields = dict(stages1=dict(num_stages=1), stages2=dict(num_stages=2), warps4=dict(num_warps=4),
                      bm64=dict(block_m=64), bn32=dict(block_n=32), bk32=dict(block_k=32))[variant]
        fl._CONFIGS[key] = dataclasses.replace(cfg, **fields)
    case = make_case(150, 150, sizes, R, [True] * S, dtype, device="cuda", seed=3)
    try:
        got = run_fused(case, p=p, seed=11, backend="triton")
        torch.cuda.synchronize()
        ref = run_reference(case, p=p, seed=11)
        errs = " ".join(
            f"{rel_err(g, r):.1e}" if torch.isfinite(g).all() else "NaN" for g, r in zip(got, ref)
        )
    except Exception as err:
        errs = f"ERR {type(err).__name__}: {str(err)[:80]}"
    print(f"R{R} S{S} p{p} {args[3]} {variant:<10} {errs}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
