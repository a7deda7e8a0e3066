"""The text tower alone on a dataset's class prompts: full 77-token context, trimmed to
the longest prompt, and length-bucketed (the cost model's choice, and the best split
into at most 1, 2, 4 and 8 buckets).

Each row records the tokens the tower processes and the time of its forward+backward
(LoRA on q/k/v, gradients into the adapters), after its features and LoRA gradients
were checked against the full-context ``encode_text`` in fp32.  Ratios are taken
within one group (one dataset, one run).  The datasets are those whose class names
ship with the package (ImageNet, EuroSAT).
"""

from __future__ import annotations

import pytest
import torch

from .measure import STEP_BUDGET, run_benchmark
from .providers import TEXT_TOLERANCE, build_text_model, check_text, make_text_step, text_reference
from .workloads import (
    CONTEXT_LENGTH,
    PROMPT_TEMPLATE,
    TEXT_PROVIDERS,
    bench_size,
    dataset_classnames,
    text_flops,
    text_plan,
)

SIZE = bench_size()
DATASETS = [d for d in ("ImageNet", "EuroSAT") if dataset_classnames(d) is not None]


@pytest.fixture(scope="module")
def text_case(device):
    """``dataset -> (model, params, tokens, dy, reference)``, built once per dataset."""
    import open_clip

    from clip_lora.text import class_prompts

    cache = {}

    def get(dataset: str):
        if dataset not in cache:
            model, params = build_text_model(SIZE, device)
            tokens = open_clip.get_tokenizer("ViT-B-16")(class_prompts(dataset_classnames(dataset), PROMPT_TEMPLATE))
            tokens = tokens.to(device)
            g = torch.Generator(device="cpu").manual_seed(1)
            dy = torch.randn(len(tokens), model.text_projection.shape[1], generator=g).to(device)
            cache.clear()  # one model alive at a time
            cache[dataset] = (model, params, tokens, dy, text_reference(model, params, tokens, dy))
        return cache[dataset]

    return get


@pytest.mark.parametrize("provider", TEXT_PROVIDERS)
@pytest.mark.parametrize("dataset", DATASETS)
def test_text_tower(benchmark, text_case, device, dataset, provider):
    model, params, tokens, dy, ref = text_case(dataset)
    errs = check_text(model, provider, params, tokens, dy, ref)
    lengths = (tokens.argmax(dim=-1) + 1).tolist()
    plan = text_plan(provider, lengths)
    n = len(lengths)
    dtype = torch.bfloat16 if device.type == "cuda" else None  # CPU: fp32, the exact path
    benchmark.group = f"text {dataset}"
    benchmark.extra_info.update(
        kind="text",
        provider=provider,
        size=SIZE,
        device=str(device),
        dtype="bf16" if dtype else "fp32",
        workload=dataset,
        n_classes=n,
        layers=model.transformer.layers,
        tokens=plan.tokens if plan else n * CONTEXT_LENGTH,
        buckets=len(plan.lengths) if plan else 1,
        bucket_lengths=list(plan.lengths) if plan else [CONTEXT_LENGTH],
        trimmed_tokens=max(lengths) * n,
        full_tokens=n * CONTEXT_LENGTH,
        prompt_tokens=sum(lengths),
        check_rel_err=errs,
        check_tol=TEXT_TOLERANCE,
    )
    run_benchmark(
        benchmark,
        make_text_step(model, provider, params, tokens, dy, dtype),
        device=device,
        budget=STEP_BUDGET[device.type],
        flops=text_flops(n * CONTEXT_LENGTH, SIZE),
        grad_to_none=params,
    )
