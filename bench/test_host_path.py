"""Host time of one projection's forward+backward with the kernels stubbed (bench.host_path).

Runs on any machine (the kernels never launch); the ratios to ``F.linear`` are the
claim, on the CPU that ran them (``python -m bench.host_path`` prints them from one
interleaved run).  Before timing, the fused call is checked against plain LoRA with the
kernels in place.
"""

from __future__ import annotations

import pytest
import torch

from . import host_path


def _check_fused_against_plain() -> None:
    import lora_kernels

    g = torch.Generator().manual_seed(0)
    x = torch.randn(host_path.M, host_path.K, generator=g, dtype=torch.float64)
    w = torch.randn(host_path.SLOTS * host_path.K, host_path.K, generator=g, dtype=torch.float64)
    a = [torch.randn(host_path.RANK, host_path.K, generator=g, dtype=torch.float64) for _ in range(host_path.SLOTS)]
    b = [torch.randn(host_path.K, host_path.RANK, generator=g, dtype=torch.float64) for _ in range(host_path.SLOTS)]
    layout = lora_kernels.slot_layout(host_path.K, [host_path.K] * host_path.SLOTS, host_path.RANK)
    got = lora_kernels.lora_linear_packed(
        x, w, None, lora_a=torch.cat(a), lora_b=torch.cat(b), layout=layout, scale=host_path.SCALE
    )
    want = lora_kernels.plain_lora_linear(x, w, None, lora_a=a, lora_b=b, scale=host_path.SCALE)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def runs():
    _check_fused_against_plain()
    return host_path.make_runs()


@pytest.fixture(scope="module")
def cuda_runs():
    return host_path.make_runs(device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU: real launches on tiny shapes")
@pytest.mark.parametrize("provider", host_path.PROVIDERS)
def test_host_path_cuda(benchmark, cuda_runs, provider):
    """The same rows with the real kernels on a GPU: host-bound, Triton's launches
    included.  Each call ends with a synchronisation (the same few µs in every row);
    ``python -m bench.host_path --cuda`` synchronises once per 50 calls instead."""
    benchmark.group = "host path (CUDA, real launches)"
    layers = host_path.layers_per_call(provider)
    benchmark.extra_info.update(kind="host", provider=provider, layers_per_call=layers, device="cuda")
    run = cuda_runs[provider]

    def synced() -> None:
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=20, iterations=50, warmup_rounds=1)
    benchmark.extra_info["min_us_per_layer"] = benchmark.stats.stats.min * 1e6 / layers


@pytest.mark.parametrize("provider", host_path.PROVIDERS)
def test_host_path(benchmark, runs, provider):
    benchmark.group = "host path (kernels stubbed)"
    benchmark.extra_info.update(
        kind="host", provider=provider, layers_per_call=host_path.layers_per_call(provider), device="cpu"
    )
    with host_path.stubbed_kernels():
        benchmark.pedantic(runs[provider], rounds=20, iterations=50, warmup_rounds=1)
    # What bench.report tabulates: the minimum (load only ever adds), per layer.
    layers = host_path.layers_per_call(provider)
    benchmark.extra_info["min_us_per_layer"] = benchmark.stats.stats.min * 1e6 / layers
