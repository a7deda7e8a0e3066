"""Shared inputs and the fp64 reference for the kernel tests.

The reference (:func:`lora_kernels.reference.reference_lora_linear`) is independent of
the kernels' hand-derived backward: it builds the forward in fp64 from the public mask
helper and lets autograd differentiate it.  Inputs are fresh random values (never
zeros) at shapes that are not multiples of the block sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_kernels import lora_linear
from lora_kernels.reference import reference_lora_linear


@dataclass
class Case:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: list[torch.Tensor | None]
    lora_b: list[torch.Tensor | None]
    slot_sizes: list[int]
    dy: torch.Tensor
    scale: float = 0.7


def make_case(
    M: int,
    K: int,
    slot_sizes: list[int],
    rank: int,
    adapted: list[bool],
    dtype: torch.dtype,
    *,
    bias: bool = True,
    device: str = "cpu",
    param_dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Case:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dt)

    N = sum(slot_sizes)
    # B is non-zero (unlike a fresh adapter) so every gradient path carries signal; the
    # LoRA term is scaled to the same size as the base output so both are tested.
    return Case(
        x=rnd(M, K),
        weight=rnd(N, K, std=K**-0.5),
        bias=rnd(N) if bias else None,
        lora_a=[rnd(rank, K, std=K**-0.5, dt=param_dtype) if a else None for a in adapted],
        lora_b=[rnd(n, rank, std=rank**-0.5, dt=param_dtype) if a else None for a, n in zip(adapted, slot_sizes)],
        slot_sizes=slot_sizes,
        dy=rnd(M, N),
    )


def run_fused(case: Case, *, p: float, seed: int, backend: str):
    """Outputs and gradients of the fused op: [y, dx, dA_s..., dB_s...]."""
    x = case.x.clone().requires_grad_()
    a = [t.clone().requires_grad_() if t is not None else None for t in case.lora_a]
    b = [t.clone().requires_grad_() if t is not None else None for t in case.lora_b]
    y = lora_linear(
        x, case.weight, case.bias, lora_a=a, lora_b=b, scale=case.scale,
        slot_sizes=case.slot_sizes, dropout_p=p, seed=seed, backend=backend,
    )
    y.backward(case.dy)
    return [y.detach(), x.grad] + [t.grad for t in a if t is not None] + [t.grad for t in b if t is not None]


def run_reference(case: Case, *, p: float, seed: int, dtype: torch.dtype = torch.float64):
    """The same quantities computed in ``dtype`` (fp64 by default) by autograd."""
    x = case.x.to(dtype).requires_grad_()
    a = [t.to(dtype).requires_grad_() if t is not None else None for t in case.lora_a]
    b = [t.to(dtype).requires_grad_() if t is not None else None for t in case.lora_b]
    out = reference_lora_linear(
        x, case.weight.to(dtype), case.bias.to(dtype) if case.bias is not None else None,
        lora_a=a, lora_b=b, scale=case.scale, slot_sizes=case.slot_sizes, dropout_p=p, seed=seed,
    )
    out.backward(case.dy.to(dtype))
    return [out.detach(), x.grad] + [t.grad for t in a if t is not None] + [t.grad for t in b if t is not None]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(got).all(), "NaN or Inf in the result"
    return ((got - ref).norm() / ref.norm()).item()
