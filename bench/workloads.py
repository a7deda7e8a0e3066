"""What the benchmarks run: layer shapes, the 11 dataset workloads, and FLOP formulas.

Two sizes share one suite.  ``full`` is the claim: the shapes of DESIGN.md section 4
(ViT-B/16 with batch 32, the text tower with 77 tokens per class prompt), run on a GPU.
``small`` keeps every benchmark, provider and check but shrinks M, d and the model so
that ``pytest bench/ --benchmark-only`` finishes in minutes on a 2-core CPU; it proves
the suite works, its times are not the claim.  The default is ``full`` with CUDA and
``small`` without; ``CLIP_LORA_BENCH_SIZE`` overrides it (e.g. ``small`` on a GPU for a
quick look).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

SIZE_ENV = "CLIP_LORA_BENCH_SIZE"
SIZES = ("full", "small")

# The text batch of one CLIP-LoRA step is every class prompt of the dataset.
DATASETS: dict[str, int] = {
    "ImageNet": 1000,
    "SUN397": 397,
    "StanfordCars": 196,
    "Flowers102": 102,
    "Food101": 101,
    "UCF101": 101,
    "Caltech101": 100,
    "FGVCAircraft": 100,
    "DTD": 47,
    "OxfordPets": 37,
    "EuroSAT": 10,
}

CONTEXT_LENGTH = 77  # CLIP's text context: every prompt is padded to 77 tokens
PROMPT_TEMPLATE = "a photo of a {}."

# Layer benchmark defaults: the paper's recipe (r = 2, p = 0.25), scale alpha/sqrt(r).
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
RANK = 2
DROPOUT = 0.25
RANKS = (1, 2, 4, 8, 16, 32, 64)
MODES = ("forward", "backward", "fwd+bwd")
# Forward+backward captured in a CUDA graph and replayed: the kernels' GPU time without
# the host's (bench/test_layer.py::test_layer_graph, CUDA only).
GRAPH_MODE = "fwd+bwd graph"


def bench_size() -> str:
    """``full`` with CUDA, ``small`` without, unless ``CLIP_LORA_BENCH_SIZE`` says otherwise."""
    size = os.environ.get(SIZE_ENV) or ("full" if torch.cuda.is_available() else "small")
    if size not in SIZES:
        raise ValueError(f"{SIZE_ENV} must be one of {', '.join(SIZES)}, got {size!r}")
    return size


# =============================================================================
# Layer shapes
# =============================================================================


@dataclass(frozen=True)
class LayerShape:
    """One projection: ``Y [M, N] = X [M, K] Wᵀ`` with ``slots`` equal column slots, each adapted."""

    name: str
    M: int
    K: int
    N: int
    slots: int

    @property
    def slot_sizes(self) -> list[int]:
        return [self.N // self.slots] * self.slots

    def as_dict(self) -> dict[str, int | str]:
        return {"workload": self.name, "M": self.M, "K": self.K, "N": self.N, "slots": self.slots}


def _text_classes(size: str) -> tuple[int, ...]:
    return (10, 100, 1000) if size == "full" else (1, 10, 100)


def layer_shapes(size: str) -> list[LayerShape]:
    """The layer workloads: ViT-B/16 vision qkv and out-proj, text qkv, ViT-L/14 vision qkv.

    ``small`` divides d by 4 and uses 2 images and a tenth of the class counts, which
    keeps the same slot layouts and the same M : d proportions between workloads.
    """
    if size == "full":
        images, d_b16, d_text, d_l14 = 32, 768, 512, 1024
    else:
        images, d_b16, d_text, d_l14 = 2, 192, 128, 256
    shapes = [
        LayerShape("vitb16-vision-qkv", images * 197, d_b16, 3 * d_b16, 3),
        LayerShape("vitb16-vision-out", images * 197, d_b16, d_b16, 1),
    ]
    for n_classes in _text_classes(size):
        shapes.append(LayerShape(f"vitb16-text-qkv-c{n_classes}", CONTEXT_LENGTH * n_classes, d_text, 3 * d_text, 3))
    shapes.append(LayerShape("vitl14-vision-qkv", images * 257, d_l14, 3 * d_l14, 3))
    return shapes


def layer_flops(shape: LayerShape, rank: int, mode: str, *, lora: bool = True) -> int:
    """Useful FLOPs of one layer call (a multiply-add counts 2).

    forward:  ``2MNK`` (X Wᵀ) + ``2·M·K·r·S`` (H = drop(X) Aᵀ, S slots) + ``2·M·N·r`` (H Bᵀ)
    backward: ``2MNK`` (dY W; W is frozen, no dW) + ``2·2·M·N·r`` (dH = dY B, dB = dYᵀ H)
              + ``2·2·M·K·r·S`` (dA = dHᵀ drop(X), dX += dH A)

    Every LoRA provider is credited with the same useful work, so TFLOP/s ratios equal
    time ratios (the official layout does more, e.g. the dense ``B @ A``, and that extra
    work is its cost, not a credit).  ``lora=False`` is the frozen floor: ``2MNK`` each way.
    """
    M, K, N, S = shape.M, shape.K, shape.N, shape.slots
    base = 2 * M * N * K
    if lora:
        fwd = base + 2 * M * K * rank * S + 2 * M * N * rank
        bwd = base + 4 * M * N * rank + 4 * M * K * rank * S
    else:
        fwd = bwd = base
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd, GRAPH_MODE: fwd + bwd}[mode]


# =============================================================================
# CLIP-LoRA training-step workloads
# =============================================================================

# The small size's model: the real open_clip architecture (same classes, packed
# attention, 77-token causal text tower, real tokenizer) at a width and depth that a
# 2-core CPU steps through in tens of milliseconds.
TINY_MODEL = "bench-tiny-clip"
TINY_MODEL_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class StepWorkload:
    """One CLIP-LoRA training step on a dataset's workload (its class count)."""

    dataset: str
    n_classes: int
    model: str
    batch: int
    image_size: int

    def as_dict(self) -> dict[str, int | str]:
        return {
            "workload": self.dataset,
            "n_classes": self.n_classes,
            "model": self.model,
            "batch": self.batch,
            "image_size": self.image_size,
        }


def step_workloads(size: str) -> list[StepWorkload]:
    """ViT-B/16, batch 32, 224² images, every class prompt; ``small``: the tiny model,
    4 images of 64² and a twentieth of the classes (at least 2)."""
    if size == "full":
        return [StepWorkload(name, n, "ViT-B-16", 32, 224) for name, n in DATASETS.items()]
    return [StepWorkload(name, max(2, round(n / 20)), TINY_MODEL, 4, 64) for name, n in DATASETS.items()]


def register_tiny_model(directory: Path) -> None:
    """Make ``TINY_MODEL`` known to open_clip (it reads model configs from JSON files)."""
    import open_clip

    if TINY_MODEL in open_clip.list_models():
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{TINY_MODEL}.json"
    path.write_text(json.dumps(TINY_MODEL_CONFIG))
    open_clip.add_model_config(path)


def model_dims(model_name: str) -> dict[str, dict[str, float]]:
    """Width, depth and MLP ratio of each tower, from open_clip's config for ``model_name``."""
    import open_clip

    cfg = TINY_MODEL_CONFIG if model_name == TINY_MODEL else open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"open_clip has no config named {model_name!r}")
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    return {
        "vision": {
            "width": v["width"],
            "layers": v["layers"],
            "mlp_ratio": v.get("mlp_ratio", 4.0),
            "seq": 1 + (v["image_size"] // v["patch_size"]) ** 2,
        },
        "text": {
            "width": t["width"],
            "layers": t["layers"],
            "mlp_ratio": t.get("mlp_ratio", 4.0),
            "seq": CONTEXT_LENGTH,
        },
    }


def tower_flops(tokens: int, seq: int, width: int, layers: int, mlp_ratio: float = 4.0) -> tuple[int, int]:
    """(forward, backward) FLOPs of a transformer tower whose weights are all frozen.

    Per block, T tokens, width d, sequence length L:
      projections  ``2·T·d²·(4 + 2·mlp_ratio)``  (packed qkv 3d², out d², MLP 2·ratio·d²)
      attention    ``2·2·T·L·d``  (QKᵀ and PV; the causal text mask is not discounted)
    Backward computes only activation gradients (no dW): the projections again and
    twice the attention (dP, dV, dQ, dK).
    """
    proj = 2 * tokens * width * width * (4 + 2 * mlp_ratio)
    attn = 4 * tokens * seq * width
    return int(layers * (proj + attn)), int(layers * (proj + 2 * attn))


def step_flops(work: StepWorkload) -> int:
    """FLOPs of one untrimmed training step: both towers forward and backward.

    Vision: ``batch`` images of ``seq`` tokens; text: ``n_classes`` prompts of 77 tokens
    (:func:`tower_flops`).  Left out, all under 1 %: the patch embedding, the LoRA terms
    (r = 2), layer norms, the logits and the AdamW update.  Every provider, including the
    trimmed text tower and the frozen floor, is credited with this same count, so TFLOP/s
    ratios equal time ratios.
    """
    dims = model_dims(work.model)
    v, t = dims["vision"], dims["text"]
    vf, vb = tower_flops(work.batch * int(v["seq"]), int(v["seq"]), int(v["width"]), int(v["layers"]), v["mlp_ratio"])
    tf, tb = tower_flops(
        work.n_classes * CONTEXT_LENGTH, CONTEXT_LENGTH, int(t["width"]), int(t["layers"]), t["mlp_ratio"]
    )
    return vf + vb + tf + tb


def step_bucket_cost(provider: str, device: torch.device) -> int:
    """The per-bucket cost a step provider plans with on ``device``: the training loop's,
    which depends on the device alone (eager and compiled towers plan alike).  Providers
    plan through this one function so that a harness test can give each its own cost."""
    from clip_lora.text import bucket_cost

    return bucket_cost(device)


def text_tokens(provider: str, tokens: torch.Tensor) -> int:
    """Tokens the text tower processes for ``tokens`` under a step provider: the full
    context, the longest prompt per row (``+trim``) or the bucket plan (``+bucket``, at
    :func:`step_bucket_cost`)."""
    from clip_lora.text import plan_buckets

    lengths = (tokens.argmax(dim=-1) + 1).tolist()
    if "+bucket" in provider:
        return plan_buckets(lengths, cost=step_bucket_cost(provider, tokens.device)).tokens
    if "+trim" in provider:
        return max(lengths) * len(lengths)
    return tokens.shape[0] * tokens.shape[1]


# =============================================================================
# Text-tower workloads: the class prompts of one step, alone
# =============================================================================

# Provider names, in the order the report's columns list them (bench.providers builds them).
LAYER_PROVIDERS = ("fused", "plain", "official-style", "plain+compile", "frozen")
# The fused op with the split backward (lora_kernels/split_backward.py), for the A/B
# against the one-pass backward: in the CUDA-graph rows and the profile only.
SPLIT_PROVIDER = "fused+split"
FUSED_LAYER_PROVIDERS = ("fused", SPLIT_PROVIDER)
STEP_PROVIDERS = (
    "fused",
    "plain",
    "fused+trim",
    "fused+bucket",
    "fused+bucket+half",
    "fused+bucket+half+compile",
    "official",
    "frozen",
    "frozen+bucket+half",
)
# Only in test_step_options: the compiled step trimmed to one bucket, against which the
# compiled bucketed step shows what bucketing does once CUDA graphs remove the host cost
# of each bucket's pass (the per-bucket cost clip_lora.text.BUCKET_COST_TOKENS assumes).
OPTION_ONLY_PROVIDERS = ("fused+trim+half+compile",)
# The interleaved per-dataset step table (bench/test_step.py::test_step_table): the
# providers of the step target and of the floors, measured round-robin.
STEP_TABLE_PROVIDERS = ("fused", "plain", "frozen", "official", "fused+bucket+half", "frozen+bucket+half")
# Its per-dataset ratios, ``label -> (numerator, denominator)``: the step target (plain ÷
# fused ≥ 1.25, DESIGN.md section 4), the distance to the no-LoRA floor, the paper code's
# step against the eager step with the options on, and that step's distance to its floor.
STEP_TABLE_RATIOS = {
    "plain ÷ fused": ("plain", "fused"),
    "fused ÷ frozen": ("fused", "frozen"),
    "official ÷ fused+bucket+half": ("official", "fused+bucket+half"),
    "fused+bucket+half ÷ frozen+bucket+half": ("fused+bucket+half", "frozen+bucket+half"),
}
# Its rounds.  On the H200 (bench/results/NVIDIA-H200-20261126, test_step's do_bench
# medians) one step of each of those six providers took 0.52 s on ImageNet, 0.28 s on
# SUN397 and 0.22-0.29 s on the other nine: 3.1 s a round over the 11 workloads.  So 30
# rounds and the warm-up round measure 31 x 3.1 = ~96 s; the 66 model builds and checks
# (~1.1 s each, from stage 4b's 2.2 s per test_step benchmark less its ~1.1 s of timing)
# and a process start bring the whole table to ~190 s on a GPU.  On CPU (the small size,
# one thread) 5 rounds keep the 11 workloads within about a minute.
STEP_TABLE_ROUNDS = {"cpu": 5, "cuda": 30}
TEXT_PROVIDERS = ("full", "trimmed", "bucketed", "bucket1", "bucket2", "bucket4", "bucket8")


def text_tower_config(size: str) -> dict:
    """The open_clip config of the text-tower benchmarks: ViT-B/16's (width 512, 8 heads,
    12 blocks, 77-token causal context, EOT pooling, the real tokenizer).  ``small``
    keeps one block of width 256 (4 heads of 64), so that the 1000 ImageNet prompts at
    full context run forward and backward in seconds on a 2-core CPU: every provider
    runs the same blocks, and at these prompt lengths (≤ 18 tokens trimmed) a block's
    time is its GEMMs', proportional to tokens at any width, so the ratios between
    providers are the tower's.  The vision tower is shrunk in both: it never runs here."""
    import copy

    import open_clip

    cfg = copy.deepcopy(open_clip.get_model_config("ViT-B-16"))
    cfg["vision_cfg"].update(layers=1, width=64, head_width=32, image_size=32, patch_size=16)
    if size == "small":
        cfg["text_cfg"].update(layers=1, width=256, heads=4)
    return cfg


def dataset_classnames(dataset: str) -> list[str] | None:
    """The class names the package ships for ``dataset`` (ImageNet's 1000, EuroSAT's 10
    renamed classes), or None: the other datasets' names come from their CoOp split
    files, which are not shipped."""
    from clip_lora.data import imagenet_classes
    from clip_lora.data.datasets import EUROSAT_NEW_CNAMES

    if dataset == "ImageNet":
        return [name for _, name in imagenet_classes()]
    if dataset == "EuroSAT":
        return list(EUROSAT_NEW_CNAMES.values())
    return None


def text_plan(provider: str, lengths: list[int], device: torch.device | str = "cpu"):
    """The bucket plan a text provider runs on ``device`` (``full``: None, the 77-token
    context; ``bucketed``: the cost model at that device's eager per-bucket cost)."""
    from clip_lora.text import bucket_cost, plan_buckets

    if provider == "full":
        return None
    if provider == "trimmed":
        return plan_buckets(lengths, max_buckets=1)
    if provider == "bucketed":
        return plan_buckets(lengths, cost=bucket_cost(device))
    if provider.startswith("bucket"):
        # At most K buckets chosen by tokens alone: what K buckets can do at best.
        return plan_buckets(lengths, max_buckets=int(provider.removeprefix("bucket")), cost=0)
    raise ValueError(f"unknown text provider {provider!r}; known: {', '.join(TEXT_PROVIDERS)}")


def text_flops(tokens: int, size: str) -> int:
    """Forward+backward FLOPs of the text tower on ``tokens`` tokens of full context
    (:func:`tower_flops`); every provider is credited with the full-context count."""
    t = text_tower_config(size)["text_cfg"]
    f, b = tower_flops(tokens, CONTEXT_LENGTH, t["width"], t["layers"], t.get("mlp_ratio", 4.0))
    return f + b
