"""Roofline floors for the layer benchmark shapes (no GPU needed).

    python -m bench.floors [--tflops 790] [--tbps 3.0]

For each shape: FLOPs and the minimum bytes that forward and backward must move, and
the floor time max(FLOPs / peak, bytes / bandwidth).  Defaults are the H100 figures
measured on our GPU machine (shared/gpu/README.md): ~790 TFLOP/s dense bf16 and
~3.0 TB/s device copy (read + write bytes).  The floor of the fused layer and of the
frozen base differ only by the LoRA terms, which are tiny at r=2, so a fused ÷ frozen
ratio near 1 is reachable in principle; what it costs above that (mask hashing, the
extra X read in backward, partial reductions, launches) is listed in bench/NOTES.md.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

BYTES = 2  # bf16 / fp16 activations and weights


@dataclass(frozen=True)
class Shape:
    name: str
    M: int
    K: int
    N: int
    slots: int
    rank: int = 2


SHAPES = [
    Shape("ViT-B/16 vision qkv (32 img)", 32 * 197, 768, 3 * 768, 3),
    Shape("ViT-B/16 vision out_proj", 32 * 197, 768, 768, 1),
    Shape("text qkv, 10 classes", 77 * 10, 512, 3 * 512, 3),
    Shape("text qkv, 100 classes", 77 * 100, 512, 3 * 512, 3),
    Shape("text qkv, 1000 classes", 77 * 1000, 512, 3 * 512, 3),
    Shape("ViT-L/14 vision qkv (32 img)", 32 * 257, 1024, 3 * 1024, 3),
]


def flops(s: Shape) -> tuple[float, float]:
    """(forward, backward) FLOPs of the fused layer, LoRA terms included."""
    sr = s.slots * s.rank
    base = 2.0 * s.M * s.N * s.K
    lora_fwd = 2.0 * s.M * s.K * sr + 2.0 * s.M * s.N * s.rank
    # backward: dH = dY B, dB = dYᵀ H, dA = dHᵀ X, dX += dH A
    lora_bwd = 2 * (2.0 * s.M * s.N * s.rank) + 2 * (2.0 * s.M * s.K * sr)
    return base + lora_fwd, base + lora_bwd


def min_bytes(s: Shape) -> tuple[float, float]:
    """(forward, backward) bytes that must cross HBM at least once."""
    x, w, y = s.M * s.K * BYTES, s.N * s.K * BYTES, s.M * s.N * BYTES
    fwd = x + w + y  # read X, W; write Y
    bwd = y + w + x + x  # read dY, W, X (for dA); write dX
    return fwd, bwd


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tflops", type=float, default=790.0)
    parser.add_argument("--tbps", type=float, default=3.0)
    args = parser.parse_args(argv)
    print(f"Floors at {args.tflops:g} TFLOP/s and {args.tbps:g} TB/s\n")
    print("| shape | M | K | N | fwd GFLOP | fwd MB | fwd floor µs | bwd GFLOP | bwd MB | bwd floor µs | bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in SHAPES:
        (ff, fb), (bf, bb) = flops(s), min_bytes(s)
        t = [max(f / (args.tflops * 1e12), b / (args.tbps * 1e12)) * 1e6 for f, b in ((ff, bf), (fb, bb))]
        bound = "compute" if ff / (args.tflops * 1e12) > bf / (args.tbps * 1e12) else "memory"
        print(
            f"| {s.name} | {s.M} | {s.K} | {s.N} | {ff / 1e9:.2f} | {bf / 1e6:.1f} | {t[0]:.1f} | "
            f"{fb / 1e9:.2f} | {bb / 1e6:.1f} | {t[1]:.1f} | {bound} |"
        )


if __name__ == "__main__":
    main()
