"""Benchmark-suite setup: the device, the size, and where every number came from.

Unlike ``tests/conftest.py``, nothing here turns on Triton's interpreter: on CPU the
fused provider runs its PyTorch path (backend auto), which is what a CPU user gets.
"""

from __future__ import annotations

import datetime
import os
import platform

import pytest
import torch

from .workloads import SIZE_ENV, bench_size, register_tiny_model


def _versions() -> dict[str, str | None]:
    import open_clip
    import triton

    return {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "open_clip": open_clip.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def bench_context() -> dict[str, object]:
    """GPU, versions, date and suite size: stored with every run (STYLE.md section 8)."""
    cuda = torch.cuda.is_available()
    ctx: dict[str, object] = {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)",
        "size": bench_size(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_threads": torch.get_num_threads(),
        **_versions(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        ctx["gpu_capability"] = f"{props.major}.{props.minor}"
        ctx["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
    return ctx


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["clip_lora_bench"] = bench_context()


def pytest_report_header(config):
    return f"clip-lora bench: size={bench_size()} (set {SIZE_ENV}=full|small), context={bench_context()}"


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def tiny_model_registered(tmp_path_factory) -> None:
    """The small size's open_clip config, written where open_clip can read it."""
    register_tiny_model(tmp_path_factory.mktemp("open_clip_configs"))
