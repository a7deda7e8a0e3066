"""Layer benchmarks: one LoRA projection, forward, backward and forward+backward.

Groups (``benchmark.group``) hold the five providers of one workload, dtype, rank,
dropout and mode, so ``bench.report`` can divide each by ``fused`` from the same run:

* the main matrix: every layer shape x {bf16, fp16} x every mode, r = 2, p = 0.25;
* a rank sweep on the ViT-B/16 vision qkv projection (bf16, forward+backward);
* p = 0 on every shape (bf16, forward+backward): the kernels without a dropout mask;
* on a GPU, the headline shapes' forward+backward captured in a CUDA graph
  (``fwd+bwd graph``): the kernels' own time, without the host's Python and launches.

Each benchmark first checks its provider against the fp64 reference on the very inputs
it then times (:func:`bench.providers.check_layer`).
"""

from __future__ import annotations

import pytest
import torch

from .measure import LAYER_BUDGET, cuda_graph, profile_ops, run_benchmark
from .providers import LAYER_PROVIDERS, TOLERANCES, backward_impl, check_layer, layer_forward, make_layer_case
from .workloads import (
    DROPOUT,
    DTYPES,
    FUSED_LAYER_PROVIDERS,
    GRAPH_MODE,
    MODES,
    RANK,
    RANKS,
    SPLIT_PROVIDER,
    LayerShape,
    bench_size,
    layer_flops,
    layer_shapes,
)

SIZE = bench_size()
SHAPES = layer_shapes(SIZE)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _skip_reason(provider: str, shape: LayerShape, dtype: str, rank: int, p: float) -> str | None:
    # Inductor needs ~20 s per graph on a 2-core CPU, and the suite has dozens of
    # graphs; on CPU the provider is compiled for one workload only, and says so.
    if provider == "plain+compile" and DEVICE.type == "cpu":
        if (shape.name, dtype, rank, p) != (SHAPES[0].name, "bf16", RANK, DROPOUT):
            return (
                f"plain+compile on CPU runs only on {SHAPES[0].name} bf16 r{RANK} p{DROPOUT} "
                "(torch.compile costs ~20 s per graph on CPU); a GPU run covers every workload"
            )
    return None


def bench_layer(benchmark, provider: str, shape: LayerShape, dtype: str, rank: int, p: float, mode: str) -> None:
    reason = _skip_reason(provider, shape, dtype, rank, p)
    if reason:
        pytest.skip(reason)
    with backward_impl(provider):
        _bench_layer(benchmark, provider, shape, dtype, rank, p, mode)


def _bench_layer(benchmark, provider: str, shape: LayerShape, dtype: str, rank: int, p: float, mode: str) -> None:
    case = make_layer_case(shape, DTYPES[dtype], rank, p, DEVICE)
    errs = check_layer(provider, case)

    forward = layer_forward(provider, case)
    if mode == "forward":
        fn = forward
    elif mode == "backward":
        # One forward whose graph every timed backward reuses: only the backward is timed.
        y = forward()

        def fn() -> None:
            y.backward(case.dy, retain_graph=True)

    else:

        def fn() -> None:
            forward().backward(case.dy)

    grad_to_none = case.grad_tensors()
    if mode == GRAPH_MODE:
        fn = cuda_graph(fn, DEVICE, grads=grad_to_none)
        grad_to_none = []  # the graph owns the gradients: every replay rewrites them

    benchmark.group = f"layer {shape.name} {dtype} r{rank} p{p} {mode}"
    benchmark.extra_info.update(
        kind="layer",
        provider=provider,
        mode=mode,
        dtype=dtype,
        rank=rank,
        p=p,
        size=SIZE,
        device=str(DEVICE),
        **shape.as_dict(),
        check_rel_err=errs,
        check_tol=TOLERANCES[case.dtype],
        check_p=p if provider in FUSED_LAYER_PROVIDERS else 0.0,
    )
    flops = layer_flops(shape, rank, mode, lora=provider != "frozen")
    budget = LAYER_BUDGET[DEVICE.type]
    run_benchmark(benchmark, fn, device=DEVICE, budget=budget, flops=flops, grad_to_none=grad_to_none)


@pytest.mark.parametrize("provider", LAYER_PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_layer(benchmark, shape, dtype, mode, provider):
    bench_layer(benchmark, provider, shape, dtype, RANK, DROPOUT, mode)


@pytest.mark.parametrize("provider", LAYER_PROVIDERS)
@pytest.mark.parametrize("rank", RANKS, ids=lambda r: f"r{r}")
def test_layer_rank_sweep(benchmark, rank, provider):
    bench_layer(benchmark, provider, SHAPES[0], "bf16", rank, DROPOUT, "fwd+bwd")


@pytest.mark.parametrize("provider", LAYER_PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_layer_no_dropout(benchmark, shape, provider):
    bench_layer(benchmark, provider, shape, "bf16", RANK, 0.0, "fwd+bwd")


# The headline shapes under CUDA graphs.  plain+compile is left out: a compiled function
# inside a hand-made capture is not how anyone runs it (--compile makes its own graphs).
GRAPH_SHAPES = ("vitb16-vision-qkv", "vitb16-vision-out")
# fused+split is the split backward's A/B against fused (lora_kernels/split_backward.py).
GRAPH_PROVIDERS = (*(p for p in LAYER_PROVIDERS if p != "plain+compile"), SPLIT_PROVIDER)


@pytest.mark.parametrize("provider", GRAPH_PROVIDERS)
@pytest.mark.parametrize("p", [DROPOUT, 0.0], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("shape", [s for s in SHAPES if s.name in GRAPH_SHAPES], ids=lambda s: s.name)
def test_layer_graph(benchmark, shape, p, provider):
    if DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need a GPU: this row is the kernels' time without the host's")
    bench_layer(benchmark, provider, shape, "bf16", RANK, p, GRAPH_MODE)


@pytest.mark.parametrize("provider", ("fused", SPLIT_PROVIDER, "plain", "frozen"))
def test_layer_profile(benchmark, provider):
    """Where one eager forward+backward of the ViT-B/16 q/k/v projection spends its time:
    each op's host and device time per call (``torch.profiler``), after the usual check.
    On a CPU the device column is empty and the host column is the whole call."""
    shape = next(s for s in SHAPES if s.name == GRAPH_SHAPES[0])
    case = make_layer_case(shape, DTYPES["bf16"], RANK, DROPOUT, DEVICE)
    result: dict = {}
    with backward_impl(provider):
        errs = check_layer(provider, case)
        forward = layer_forward(provider, case)

        def fn() -> None:
            case.zero_grads()
            forward().backward(case.dy)

        benchmark.group = f"layer profile {shape.name} bf16 r{RANK} p{DROPOUT} fwd+bwd"
        benchmark.pedantic(lambda: result.update(profile_ops(fn, DEVICE)), rounds=1, iterations=1)
    assert result["ops"] and result["host_us"] > 0
    assert DEVICE.type != "cuda" or result["device_us"] > 0, "the profiler saw no kernel on the GPU"
    benchmark.extra_info.update(
        kind="profile", provider=provider, size=SIZE, device=str(DEVICE), dtype="bf16", rank=RANK, p=DROPOUT,
        **shape.as_dict(), check_rel_err=errs, profile=result,
    )  # fmt: skip
