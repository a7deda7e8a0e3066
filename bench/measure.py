"""Timing and peak memory, recorded into pytest-benchmark.

On CUDA the time that counts is ``triton.testing.do_bench``'s median: CUDA events around
each call, after warm-up, with the L2 cache flushed between calls and gradients reset to
None outside the timed region.  pytest-benchmark's own rounds also run (``pedantic``,
one call plus ``torch.cuda.synchronize()`` per round), so its statistics are wall times
of complete calls, and the JSON keeps both.  On CPU, work is synchronous and the
pytest-benchmark median is the time.

Peak memory is ``torch.cuda.max_memory_allocated()`` during one call, after
``reset_peak_memory_stats()``: ``peak_mem_mb`` counts everything allocated (inputs,
model, optimizer state), ``peak_extra_mb`` only what the call added on top of what was
allocated when it started.  CPU has no allocator statistics, so both stay None there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

MB = 2**20


@dataclass(frozen=True)
class Budget:
    """How long to measure: do_bench's warm-up and repetition budgets (ms, CUDA) and
    pytest-benchmark's rounds."""

    warmup_ms: int
    rep_ms: int
    rounds: int
    warmup_rounds: int


# CPU rounds are few on purpose: the reduced CPU run proves the suite works, and must
# stay within minutes on 2 cores (the first, untimed call is its warm-up).
LAYER_BUDGET = {"cuda": Budget(25, 100, 20, 2), "cpu": Budget(0, 0, 3, 0)}
# A ViT-B/16 step takes tens of ms on an H100: 800 ms of do_bench is still 10+ steps,
# and the short budget lets the whole 11-workload step table fit one GPU session.
STEP_BUDGET = {"cuda": Budget(100, 800, 3, 1), "cpu": Budget(0, 0, 3, 0)}


def cuda_graph(
    fn: Callable[[], object], device: torch.device, grads: Sequence[torch.Tensor] = ()
) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph; returns the replay.

    Replaying measures the GPU work alone: no Python, no launch latency, which is what a
    training step compiled with CUDA graphs (``--compile``) pays for the same kernels.
    Warm-up on a side stream first (Triton JIT, cuBLAS handles, the allocator), as the
    CUDA-graph rules of ``torch.cuda.graph`` ask.  ``grads`` are set to None before the
    capture, so the captured backward allocates them in the graph's pool and every replay
    rewrites them (accumulating into a tensor from outside the graph would be a different
    program each replay).  ``fn`` must not keep its autograd graph alive between calls
    (keep outputs detached): a surviving graph holds the leaves' AccumulateGrad nodes from
    the stream they were made on, and the captured backward then fails.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            for t in grads:
                t.grad = None
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    for t in grads:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[float | None, float | None]:
    """(peak allocated, peak added by the call) in MiB during one call of ``fn``."""
    if device.type != "cuda":
        return None, None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak / MB, (peak - before) / MB


def do_bench_ms(fn: Callable[[], object], budget: Budget, grad_to_none: Sequence[torch.Tensor]) -> list[float]:
    """Every timed call of ``fn`` in ms, in order, from CUDA events (triton.testing).

    All samples rather than do_bench's quantiles, so that a figure that disagrees with
    another timer (bench/NOTES.md 9.6) can be read sample by sample from the JSON."""
    import triton.testing

    times = triton.testing.do_bench(
        fn,
        warmup=budget.warmup_ms,
        rep=budget.rep_ms,
        grad_to_none=list(grad_to_none) or None,
        return_mode="all",
    )
    return [float(t) for t in times]


def quantiles(samples: Sequence[float], qs: Sequence[float] = (0.5, 0.2, 0.8)) -> list[float]:
    """Linear-interpolation quantiles of ``samples`` (do_bench's own rule)."""
    t = torch.tensor(list(samples), dtype=torch.float64)
    return [float(v) for v in torch.quantile(t, torch.tensor(list(qs), dtype=torch.float64))]


def run_benchmark(
    benchmark,
    fn: Callable[[], object],
    *,
    device: torch.device,
    budget: Budget,
    flops: int,
    grad_to_none: Sequence[torch.Tensor] = (),
) -> None:
    """Warm up, record peak memory, time with do_bench (CUDA), then pytest-benchmark rounds.

    Adds ``time_ms`` (+ ``time_ms_p20``/``p80``), ``timer``, ``peak_mem_mb``,
    ``peak_extra_mb``, ``flops`` and ``tflops`` to ``benchmark.extra_info``.
    """

    def reset_grads() -> None:
        for t in grad_to_none:
            t.grad = None

    def target() -> None:
        fn()
        synchronize(device)

    # The first call pays for compilation and autotuning (Triton, torch.compile);
    # neither the memory peak nor the timings should include it.
    reset_grads()
    target()
    reset_grads()
    peak, extra = peak_memory(fn, device)
    info = benchmark.extra_info
    info["peak_mem_mb"], info["peak_extra_mb"] = peak, extra
    info["flops"] = int(flops)
    if device.type == "cuda":
        reset_grads()
        samples = do_bench_ms(fn, budget, grad_to_none)
        median, p20, p80 = quantiles(samples)
        info.update(time_ms=median, time_ms_p20=p20, time_ms_p80=p80, time_ms_samples=samples)
        info["timer"] = "triton.testing.do_bench median (CUDA events, L2 flushed)"
    benchmark.pedantic(
        target,
        setup=reset_grads if grad_to_none else None,
        rounds=budget.rounds,
        warmup_rounds=budget.warmup_rounds,
        iterations=1,
    )
    stats = getattr(benchmark.stats, "stats", None)  # None under --benchmark-disable
    if device.type != "cuda" and stats is not None:
        info.update(time_ms=stats.median * 1e3, time_ms_p20=None, time_ms_p80=None)
        info["timer"] = "host clock, pytest-benchmark median (CPU work is synchronous)"
    if info.get("time_ms"):
        info["tflops"] = flops / (info["time_ms"] * 1e-3) / 1e12


def profile_ops(fn: Callable[[], object], device: torch.device, calls: int = 20, top: int = 25) -> dict:
    """Per call of ``fn``: host and device time of each op, from ``torch.profiler``.

    Splits a layer call into what the host spends (Python-visible ops, Triton's
    launcher, allocations) and what each kernel takes on the device, which neither
    ``do_bench`` (events around the whole call) nor a CUDA-graph replay (device time of
    the whole call) can tell apart.  ``top`` ops by host + device self time.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    fn()
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    rows = []
    for e in prof.key_averages():
        # The device-time attribute was renamed (cuda -> device) across torch releases.
        dev = getattr(e, "self_device_time_total", None)
        if dev is None:
            dev = getattr(e, "self_cuda_time_total", 0.0)
        rows.append(
            {
                "op": e.key,
                "calls": e.count / calls,
                "self_host_us": e.self_cpu_time_total / calls,
                "self_device_us": float(dev) / calls,
            }
        )
    rows.sort(key=lambda r: -(r["self_host_us"] + r["self_device_us"]))
    return {
        "calls": calls,
        "host_us": sum(r["self_host_us"] for r in rows),
        "device_us": sum(r["self_device_us"] for r in rows),
        "ops": rows[:top],
    }
