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
    plan = text_plan(provider, lengths, device)
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


RATIO_PROVIDERS = ("trimmed", "bucketed", "bucket1", "bucket2", "bucket4", "bucket8")
RATIO_ROUNDS = {"cpu": 5, "cuda": 20}


@pytest.mark.parametrize("dataset", DATASETS)
def test_text_ratios(benchmark, text_case, device, dataset):
    """Tokens and forward+backward time ÷ trimmed, from one interleaved measurement.

    The per-provider rows above are timed one after another; on a shared CPU the load
    changes between them.  Here every provider runs once per round, round-robin, in one
    thread (so process CPU time measures the work alone), and the ratios use the minimum
    wall time and the median CPU time over the rounds.  Each provider is first checked
    against the full-context reference.
    """
    import statistics

    from .providers import interleaved_times

    model, params, tokens, dy, ref = text_case(dataset)
    lengths = (tokens.argmax(dim=-1) + 1).tolist()
    dtype = torch.bfloat16 if device.type == "cuda" else None
    errs = {p: check_text(model, p, params, tokens, dy, ref) for p in RATIO_PROVIDERS}
    runs = {p: make_text_step(model, p, params, tokens, dy, dtype) for p in RATIO_PROVIDERS}
    if device.type == "cuda":
        from .measure import synchronize

        runs = {p: (lambda f=f: (f(), synchronize(device))) for p, f in runs.items()}
    threads = torch.get_num_threads()
    result: dict = {}

    def measure() -> None:
        torch.set_num_threads(1)
        try:
            for run in runs.values():  # warm-up
                run()
            result.update(interleaved_times(runs, RATIO_ROUNDS[device.type]))
        finally:
            torch.set_num_threads(threads)

    benchmark.group = f"text ratios {dataset}"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    trimmed = text_plan("trimmed", lengths, device).tokens
    wall = {p: min(t["wall"]) for p, t in result.items()}
    cpu = {p: statistics.median(t["cpu"]) for p, t in result.items()}
    rows = {
        p: {
            "tokens": text_plan(p, lengths, device).tokens,
            "buckets": len(text_plan(p, lengths, device).lengths),
            "bucket_lengths": list(text_plan(p, lengths, device).lengths),
            "tokens_ratio": text_plan(p, lengths, device).tokens / trimmed,
            "wall_s": wall[p],
            "cpu_s": cpu[p],
            "wall_ratio": wall[p] / wall["trimmed"],
            "cpu_ratio": cpu[p] / cpu["trimmed"],
        }
        for p in RATIO_PROVIDERS
    }
    benchmark.extra_info.update(
        kind="text-ratios",
        provider="interleaved",
        size=SIZE,
        device=str(device),
        workload=dataset,
        n_classes=len(lengths),
        rounds=RATIO_ROUNDS[device.type],
        threads=1 if device.type == "cpu" else threads,
        trimmed_tokens=trimmed,
        full_tokens=len(lengths) * CONTEXT_LENGTH,
        prompt_tokens=sum(lengths),
        ratios=rows,
        raw=result,
        check_rel_err=errs,
        check_tol=TEXT_TOLERANCE,
    )
    assert all(r["tokens"] <= trimmed for r in rows.values())
