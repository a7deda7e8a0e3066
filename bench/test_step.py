"""CLIP-LoRA training-step benchmarks: one group per dataset workload (its class count).

A step is what the paper's training loop does 500 x shots times: the batch's images
through the vision tower, every class prompt of the dataset through the text tower,
CE loss on ``100 · cos``, backward, AdamW step, under bf16 autocast (ViT-B/16, batch
32, LoRA r = 2, alpha 1, p = 0.25 on q/k/v of every block of both towers).

Providers (:mod:`bench.providers`): ``fused``, ``plain``, ``fused+trim`` (the fused
model with the text context trimmed to the longest prompt), ``fused+bucket`` (the text
tower run in length buckets), ``fused+bucket+half`` (and frozen weights stored in the
step's dtype), ``official`` (the paper code's step: split projections with a dense
``B·A``, full 77-token text, weights cast per call), ``frozen``, the floor: no LoRA, but
backward through every block, and ``frozen+bucket+half``, the floor of the bucketed,
half-stored step.  Each is checked against the fp32 plain reference on its own batch
before it is timed.
"""

from __future__ import annotations

import pytest
import torch

from .measure import STEP_BUDGET, run_benchmark
from .providers import (
    STEP_PROVIDERS,
    STEP_TOLERANCES,
    build_step_model,
    check_step,
    make_step_inputs,
    make_train_step,
)
from .workloads import bench_size, step_flops, step_workloads, text_tokens

SIZE = bench_size()
WORKLOADS = step_workloads(SIZE)


@pytest.fixture(scope="module")
def base_model(tiny_model_registered):
    """``name -> (unpatched model on the host, tokenizer)``, built once per model."""
    from clip_lora import create_model

    built: dict[str, tuple[torch.nn.Module, object]] = {}

    def get(name: str):
        if name not in built:
            torch.manual_seed(0)
            # Random weights (timing only), with the paper's model's MLPs: OpenAI's weights run QuickGELU.
            model, _, _, tokenizer = create_model(
                name, pretrained=None, lora=None, device="cpu", activation="quickgelu"
            )
            built[name] = (model, tokenizer)
        return built[name]

    return get


@pytest.mark.parametrize("provider", STEP_PROVIDERS)
@pytest.mark.parametrize("work", WORKLOADS, ids=lambda w: w.dataset)
def test_step(benchmark, base_model, device, work, provider):
    base, tokenizer = base_model(work.model)
    inputs = make_step_inputs(work, tokenizer, device)
    model, params = build_step_model(base, provider, device)
    errs = check_step(model, provider, params, inputs)
    step = make_train_step(model, provider, params, inputs)

    benchmark.group = f"step {work.dataset}"
    benchmark.extra_info.update(
        kind="step",
        provider=provider,
        size=SIZE,
        device=str(device),
        dtype="bf16",
        **work.as_dict(),
        trainable_params=sum(p.numel() for p in params),
        longest_prompt_tokens=int(inputs.tokens.argmax(dim=-1).max()) + 1,
        text_tokens=text_tokens(provider, inputs.tokens),
        check_rel_err=errs,
        check_tol=STEP_TOLERANCES,
    )
    run_benchmark(benchmark, step, device=device, budget=STEP_BUDGET[device.type], flops=step_flops(work))
