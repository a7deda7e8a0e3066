"""The things being compared, their inputs, and the references they are checked against.

Layer providers (one LoRA projection, DESIGN.md section 4):

* ``fused``          :func:`lora_kernels.lora_linear` (Triton on CUDA; on CPU its PyTorch
                     path, since ``backend`` is left on auto);
* ``plain``          :func:`lora_kernels.plain_lora_linear`, PEFT-style eager;
* ``official-style`` :func:`lora_kernels.official_style_lora_linear`, the paper code's
                     three split projections with a dense ``B @ A``;
* ``plain+compile``  ``torch.compile`` of ``plain_lora_linear``;
* ``frozen``         ``F.linear`` forward and its ``dY @ W`` backward: the floor.

All five run the same way a CLIP-LoRA user runs them: under ``torch.autocast`` in the
benchmark dtype, with x and the frozen W/b in that dtype (requires_grad False on W, b)
and A, B as fp32 master parameters.  The fused op casts A and B inside its kernels; the
plain providers get autocast's casts (and ``plain_lora_linear`` casts x to A's dtype
first, as PEFT does).  So no provider is handed pre-cast adapters the others lack.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import lora_kernels
from lora_kernels.reference import reference_lora_linear

from .workloads import (
    FUSED_LAYER_PROVIDERS,
    LAYER_PROVIDERS,
    OPTION_ONLY_PROVIDERS,
    SPLIT_PROVIDER,
    STEP_PROVIDERS,
    LayerShape,
    step_bucket_cost,
)

# ‖out − ref‖ / ‖ref‖ against an fp64 reference.  Rounding one output to the format
# costs about 2⁻⁹ (bf16) or 2⁻¹² (fp16) relative; the plain providers add up to four
# rounded products per output (base, three adapters) and their autocast matmuls return
# dA and dB rounded to the half type, so allow a few times that, as DESIGN.md section 6
# expects (bf16 1e-3 to 1e-2).
TOLERANCES = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}


# =============================================================================
# Layer inputs
# =============================================================================


@dataclass
class LayerCase:
    """Inputs of one layer benchmark: x (grad), frozen W and b, fp32 A/B masters, dY."""

    shape: LayerShape
    dtype: torch.dtype
    rank: int
    p: float
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    lora_a: list[torch.Tensor]
    lora_b: list[torch.Tensor]
    dy: torch.Tensor
    # The same adapters packed, as patched modules hold them (one A [S·r, K] and one B
    # [N, r] leaf per projection, clip_lora.slots): what the fused provider runs on.
    packed_a: torch.Tensor | None = None
    packed_b: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.packed_a is None:
            self.packed_a = torch.cat([a.detach() for a in self.lora_a]).requires_grad_()
            self.packed_b = torch.cat([b.detach() for b in self.lora_b]).requires_grad_()

    @property
    def layout(self):
        return lora_kernels.slot_layout(self.shape.K, self.shape.slot_sizes, self.rank)

    def packed_grads(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(dA_s, dB_s) per slot, sliced from the packed leaves' gradients."""
        r, out, row = self.rank, [], 0
        for s, n in enumerate(self.shape.slot_sizes):
            out.append((self.packed_a.grad[s * r : (s + 1) * r], self.packed_b.grad[row : row + n]))
            row += n
        return out

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.rank)  # alpha / sqrt(r) with alpha = 1 (the paper's)

    @property
    def device(self) -> torch.device:
        return self.x.device

    def grad_tensors(self) -> list[torch.Tensor]:
        return [self.x, *self.lora_a, *self.lora_b, self.packed_a, self.packed_b]

    def zero_grads(self) -> None:
        for t in self.grad_tensors():
            t.grad = None


def make_layer_case(
    shape: LayerShape, dtype: torch.dtype, rank: int, p: float, device: torch.device | str, seed: int = 0
) -> LayerCase:
    """Random inputs at the scales of a real layer (unit activations, 1/√K weights).

    B is not zero, unlike a fresh adapter: a zero B would hide the adapter's error terms
    from the correctness check (and changes no timing).
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    M, K, N = shape.M, shape.K, shape.N

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g, device=device, dtype=torch.float32)

    x = randn(M, K).to(dtype).requires_grad_()
    weight = (randn(N, K) / math.sqrt(K)).to(dtype)
    bias = (0.1 * randn(N)).to(dtype)
    bound = 1.0 / math.sqrt(K)  # kaiming-uniform(a=√5) bound, as LoRA initialises A
    lora_a = [
        ((2 * torch.rand(rank, K, generator=g, device=device) - 1) * bound).requires_grad_() for _ in range(shape.slots)
    ]
    lora_b = [(0.1 * randn(n, rank)).requires_grad_() for n in shape.slot_sizes]
    dy = randn(M, N).to(dtype)
    return LayerCase(shape, dtype, rank, p, x, weight, bias, lora_a, lora_b, dy)


# =============================================================================
# Layer providers
# =============================================================================

_compiled_plain: Callable | None = None


def compiled_plain() -> Callable:
    """One ``torch.compile`` of ``plain_lora_linear`` shared by every benchmark.

    Static shapes (``dynamic=False``): each workload gets its own specialised graph, as a
    training run with fixed shapes would.  The suite compiles one graph per (shape,
    dtype, rank, p), more than dynamo's default of 8 per function, after which dynamo
    would silently fall back to eager; hence the raised limit.
    """
    global _compiled_plain
    if _compiled_plain is None:
        import torch._dynamo

        for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch releases
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 128)
        # The backward benchmarks replay one graph with retain_graph=True, which AOTAutograd
        # refuses when it donates the saved activations' buffers to the backward.
        import torch._functorch.config

        if hasattr(torch._functorch.config, "donated_buffer"):
            torch._functorch.config.donated_buffer = False
        _compiled_plain = torch.compile(lora_kernels.plain_lora_linear, dynamic=False)
    return _compiled_plain


def layer_forward(
    provider: str, case: LayerCase, *, p: float | None = None, seed: int | None = None
) -> Callable[[], torch.Tensor]:
    """A closure running ``provider``'s forward on ``case`` under autocast.

    ``p`` overrides the case's dropout (the checks use p = 0 for the providers whose
    masks come from torch's RNG); ``seed`` fixes the fused op's mask (else every call
    draws a fresh seed on the device, as a training step does).
    """
    p = case.p if p is None else p
    x, w, b = case.x, case.weight, case.bias
    common = dict(lora_a=case.lora_a, lora_b=case.lora_b, scale=case.scale, slot_sizes=case.shape.slot_sizes)
    device_type = case.device.type

    if provider in FUSED_LAYER_PROVIDERS:
        # The packed entry with a layout checked once: what a patched module calls.
        # (fused+split differs in its backward only: see backward_impl.)
        layout, a_cat, b_cat = case.layout, case.packed_a, case.packed_b

        def run() -> torch.Tensor:
            s = seed if seed is not None else (lora_kernels.draw_seed(case.device) if p > 0 else None)
            return lora_kernels.lora_linear_packed(
                x, w, b, lora_a=a_cat, lora_b=b_cat, layout=layout, scale=case.scale, dropout_p=p, seed=s
            )

    elif provider == "plain":

        def run() -> torch.Tensor:
            return lora_kernels.plain_lora_linear(x, w, b, dropout_p=p, training=True, **common)

    elif provider == "official-style":

        def run() -> torch.Tensor:
            return lora_kernels.official_style_lora_linear(x, w, b, dropout_p=p, training=True, **common)

    elif provider == "plain+compile":
        fn = compiled_plain()

        def run() -> torch.Tensor:
            return fn(x, w, b, dropout_p=p, training=True, **common)

    elif provider == "frozen":

        def run() -> torch.Tensor:
            return F.linear(x, w, b)

    else:
        known = ", ".join((*LAYER_PROVIDERS, SPLIT_PROVIDER))
        raise ValueError(f"unknown layer provider {provider!r}; known: {known}")

    def autocast_run() -> torch.Tensor:
        with torch.autocast(device_type, dtype=case.dtype):
            return run()

    return autocast_run


@contextlib.contextmanager
def backward_impl(provider: str) -> Iterator[None]:
    """The fused op's backward for ``provider`` (split for fused+split, else the one-pass
    kernel), for as long as the benchmark runs: capture, check and timing alike."""
    from lora_kernels import fused_lora

    old = fused_lora.BACKWARD_IMPL
    fused_lora.BACKWARD_IMPL = "split" if provider == SPLIT_PROVIDER else "fused"
    try:
        yield
    finally:
        fused_lora.BACKWARD_IMPL = old


# =============================================================================
# Layer reference and check
# =============================================================================


def layer_reference(case: LayerCase, *, lora: bool, p: float, seed: int | None = None) -> dict[str, torch.Tensor]:
    """fp64 outputs and gradients, written out from the math (DESIGN.md section 3).

    ``Y_s = X W_sᵀ + b_s + scale · (drop_s(X) A_sᵀ) B_sᵀ``; the gradients come from
    autograd in fp64.  With ``p > 0`` the masks are the fused op's, regenerated from ``seed``.
    """
    f64 = torch.float64
    x = case.x.detach().to(f64).requires_grad_()
    w, b = case.weight.to(f64), case.bias.to(f64)
    out: dict[str, torch.Tensor] = {}
    a_s = b_s = []
    if lora:
        a_s = [a.detach().to(f64).requires_grad_() for a in case.lora_a]
        b_s = [bb.detach().to(f64).requires_grad_() for bb in case.lora_b]
        y = reference_lora_linear(x, w, b, lora_a=a_s, lora_b=b_s, scale=case.scale, dropout_p=p, seed=seed)
    else:
        y = x @ w.t() + b
    y.backward(case.dy.to(f64))
    out["y"] = y.detach()
    out["dx"] = x.grad
    for s, (a, bb) in enumerate(zip(a_s, b_s, strict=True)):
        out[f"dA{s}"] = a.grad
        out[f"dB{s}"] = bb.grad
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp64; NaN or inf in ``out`` gives inf (never a pass)."""
    out = out.detach().to(torch.float64)
    if not torch.isfinite(out).all():
        return math.inf
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


CHECK_SEED = 1234


def check_layer(provider: str, case: LayerCase) -> dict[str, float]:
    """Run ``provider`` forward and backward on the case's inputs; compare with fp64.

    The fused op is checked at the case's dropout, with its mask regenerated from a
    fixed seed; the other providers draw masks from torch's RNG, so they are checked at
    p = 0.  Returns the relative error of Y, dX and every dA/dB; raises AssertionError
    when one exceeds the dtype's tolerance.
    """
    lora = provider != "frozen"
    p = case.p if provider in FUSED_LAYER_PROVIDERS else 0.0
    ref = layer_reference(case, lora=lora, p=p, seed=CHECK_SEED)
    case.zero_grads()
    y = layer_forward(provider, case, p=p, seed=CHECK_SEED)()
    y.backward(case.dy)
    got = {"y": y, "dx": case.x.grad}
    if lora:
        if provider in FUSED_LAYER_PROVIDERS:
            pairs = case.packed_grads()
        else:
            pairs = [(a.grad, b.grad) for a, b in zip(case.lora_a, case.lora_b, strict=True)]
        for s, (da, db) in enumerate(pairs):
            got[f"dA{s}"], got[f"dB{s}"] = da, db
    errs = {name: rel_err(got[name], ref[name]) for name in ref}
    case.zero_grads()
    tol = TOLERANCES[case.dtype]
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"{provider} on {case.shape.name} {case.dtype}: relative error above {tol:g} vs fp64: {bad}"
    return errs


# =============================================================================
# CLIP-LoRA training step
# =============================================================================

STEP_DTYPE = torch.bfloat16
# The paper's optimiser (DESIGN.md section 2); the schedule does not change the cost.
ADAMW = dict(lr=2e-4, weight_decay=1e-2, betas=(0.9, 0.999))
# The step check runs the provider twice against the fp32 plain-LoRA reference.  In
# fp32 the only differences are summation orders (the fused kernels, SDPA on trimmed
# shapes): ~1e-6 measured, while a wrong term (a missing adapter, a bad trim) is
# >= 1e-2.  Under bf16 autocast, rounding through 2 x 12 blocks costs 1e-2 to 4e-2 on
# logits (100·cos amplifies feature errors) and gradients, up to ~0.11 measured on the
# floors' trainable positional embeddings (each entry a bf16 sum over every prompt or
# image); that bound only catches a broken autocast path, the fp32 check is the exact
# one.  A half-stored model must match its fp32-stored twin under autocast exactly.
# Compiled towers against the same model eager, same dropout masks, bf16 autocast:
# Inductor fuses and keeps fp32 inside its kernels where eager rounds to bf16 between
# ops, 0.03-0.07 measured on the small EuroSAT step (CPU); with another dropout mask
# (a seed drawn differently) the gradients differ by > 1 (1.16 measured).
STEP_TOLERANCES = {"fp32": 1e-4, "bf16": 1.5e-1, "bf16 vs fp32-stored": 0.0, "bf16 compiled vs eager": 1.5e-1}


def step_classnames(n_classes: int) -> list[str]:
    """``n_classes`` real class names: ImageNet's 1000, or an even sample of them.

    The other datasets' names come from their CoOp split files, which are not shipped;
    real ImageNet names give their prompts realistic token lengths, and the trimmed
    text tower's gain depends on exactly that (the longest prompt of the batch).
    """
    from clip_lora.data import imagenet_classes

    names = [name for _, name in imagenet_classes()]
    if n_classes > len(names):
        raise ValueError(f"at most {len(names)} class names, asked for {n_classes}")
    return [names[i * len(names) // n_classes] for i in range(n_classes)]


@dataclass
class StepInputs:
    """One step's batch: images, their labels, and every class prompt's tokens.

    ``text_plans``: the tokens' bucket plans by per-bucket cost, each computed by the
    first bucketed step that plans at that cost and reused by every later one, as the
    training loop plans once per run (:func:`clip_lora.text.plan_text`).  Keyed by cost
    because the providers of one measurement share these inputs and an eager and a
    compiled step plan differently on a GPU.
    """

    images: torch.Tensor
    labels: torch.Tensor
    tokens: torch.Tensor
    text_plans: dict = field(default_factory=dict)


def make_step_inputs(work, tokenizer, device: torch.device, seed: int = 0) -> StepInputs:
    from clip_lora.text import class_prompts

    g = torch.Generator(device="cpu").manual_seed(seed)
    images = torch.randn(work.batch, 3, work.image_size, work.image_size, generator=g)
    labels = torch.randint(0, work.n_classes, (work.batch,), generator=g)
    tokens = tokenizer(class_prompts(step_classnames(work.n_classes)))
    return StepInputs(images.to(device), labels.to(device), tokens.to(device))


def _official_project(self, x, weight, bias, names):
    """``LoRAAttention._project`` as the paper's code computes it: one projection per
    slot, each with a dense ``B @ A`` update (:func:`lora_kernels.official_style_lora_linear`)."""
    lora_a = [self.lora_A[n] if n in self.lora_A else None for n in names]
    if self.merged or all(a is None for a in lora_a):
        return F.linear(x, weight, bias)
    lora_b = [self.lora_B[n] if n in self.lora_B else None for n in names]
    p = self.dropout if self.training else 0.0
    return lora_kernels.official_style_lora_linear(
        x, weight, bias, lora_a=lora_a, lora_b=lora_b, scale=self.scale, dropout_p=p, training=self.training
    )


def build_step_model(
    base: torch.nn.Module, provider: str, device: torch.device, seed: int = 0
) -> tuple[torch.nn.Module, list]:
    """A copy of ``base`` (kept on the host) on ``device``, set up as ``provider``;
    returns (model, trainable parameters).

    * ``fused`` / ``fused+trim`` / ``fused+bucket``: :func:`clip_lora.patch_fused` with
      the paper's config (the text tower run full, trimmed or length-bucketed);
    * ``fused+bucket+half``: the same, with the frozen projections stored in the step's
      dtype (:func:`clip_lora.precision.store_frozen_half`; the fp32 originals are kept
      on the host for the check);
    * ``fused+bucket+half+compile``: that model, its towers run through
      ``torch.compile`` as ``--compile`` runs them; the compiling is
      :func:`step_towers`' job, around the check and the timing;
    * ``plain``: :func:`clip_lora.patch_reference` (PEFT-style plain LoRA);
    * ``official``: the paper code's step: split q/k/v projections with a dense
      ``B @ A`` (:func:`lora_kernels.official_style_lora_linear`, swapped into each
      patched attention's projection), the full 77-token text tower, and fp32 frozen
      weights cast by autocast on every call;
    * ``frozen``: the floor, i.e. the same model with no LoRA.  It is the fused-patched
      model with its adapters merged into the frozen weights, so its attention is the
      very same SDPA code and each projection a bare ``F.linear``; only the two
      positional embeddings are trainable, which makes backward run through every block
      of both towers (activation gradients, no weight gradients), as it must for LoRA
      in every block, while its optimiser step is next to nothing;
    * ``frozen+bucket+half``: that floor with the text tower bucketed and the frozen
      weights half-stored: the floor of ``fused+bucket+half``.

    The adapters get the same random values under every provider (B is not left at
    zero, so the check sees the adapter terms).
    """
    import copy
    import types

    from clip_lora import LoRAConfig, lora_parameters, merge, patch_fused, patch_reference
    from clip_lora.patch import lora_modules
    from clip_lora.precision import store_frozen_half

    known = STEP_PROVIDERS + OPTION_ONLY_PROVIDERS
    if provider not in known:
        raise ValueError(f"unknown step provider {provider!r}; known: {', '.join(known)}")
    model = copy.deepcopy(base).to(device)
    torch.manual_seed(seed)  # A's kaiming init draws from the global generator
    (patch_reference if provider in ("plain", "official") else patch_fused)(model, LoRAConfig())
    if provider == "official":
        for _, module in lora_modules(model):
            module._project = types.MethodType(_official_project, module)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            if not p.abs().sum():  # B starts at zero
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    if provider.startswith("frozen"):
        merge(model)
        for p in model.parameters():
            p.requires_grad_(False)
        trainable = [model.positional_embedding, model.visual.positional_embedding]
        for p in trainable:
            p.requires_grad_(True)
    else:
        trainable = lora_parameters(model)
    if "+half" in provider:
        store_frozen_half(model, STEP_DTYPE, keep_fp32=True)
    return model, trainable


def step_towers(model: torch.nn.Module, provider: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a step provider runs in: for ``+compile``, the towers of ``model``
    compiled exactly as ``--compile`` compiles them (:func:`clip_lora.train.compiled_towers`:
    Inductor, ``fullgraph=True``, CUDA graphs on a GPU); otherwise nothing.  The check
    and the timed steps run inside it, so the graphs the check compiles are the ones
    timed."""
    from clip_lora.train import compiled_towers

    return compiled_towers(model, device) if "+compile" in provider else contextlib.nullcontext()


def clip_logits(model: torch.nn.Module, provider: str, inputs: StepInputs) -> torch.Tensor:
    """``100 · cos(image feature, class-prompt feature)``: the paper's logits."""
    from clip_lora import encode_text_bucketed, encode_text_trimmed, plan_text

    image = model.encode_image(inputs.images, normalize=True)
    if "+bucket" in provider:
        cost = step_bucket_cost(provider, inputs.tokens.device)
        if cost not in inputs.text_plans:
            inputs.text_plans[cost] = plan_text(model, inputs.tokens, cost=cost)
        text = encode_text_bucketed(model, inputs.tokens, normalize=True, plan=inputs.text_plans[cost])
    elif "+trim" in provider:
        text = encode_text_trimmed(model, inputs.tokens, normalize=True)
    else:
        text = model.encode_text(inputs.tokens, normalize=True)
    return 100.0 * image @ text.t()


def make_train_step(model: torch.nn.Module, provider: str, params: list, inputs: StepInputs) -> Callable[[], None]:
    """One CLIP-LoRA iteration: forward of both towers under bf16 autocast, CE loss,
    backward, AdamW step."""
    device_type = inputs.images.device.type
    opt = torch.optim.AdamW(params, **ADAMW)
    # As clip_lora.train.train_step: with CUDA graphs (compiled towers on a GPU), mark the
    # step boundary so that the last step's graph outputs may be overwritten.
    cuda_graphs = "+compile" in provider and device_type == "cuda"
    model.train()

    def step() -> None:
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device_type, dtype=STEP_DTYPE):
            loss = F.cross_entropy(clip_logits(model, provider, inputs), inputs.labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _loss_and_grads(model, provider, params, inputs, autocast: bool):
    for p in params:
        p.grad = None
    if "+compile" in provider and inputs.images.device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()
    with torch.autocast(inputs.images.device.type, dtype=STEP_DTYPE, enabled=autocast):
        logits = clip_logits(model, provider, inputs)
        loss = F.cross_entropy(logits.float(), inputs.labels)
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in params]).to(torch.float64)
    for p in params:
        p.grad = None
    return logits.detach().to(torch.float64), loss.detach().to(torch.float64), grads


def _eager_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` that runs eager.  Inside :func:`step_towers` the towers'
    ``forward`` is an instance attribute holding the compiled function, which calls the
    original modules: a plain deep copy would keep it and run the original's weights."""
    import copy

    twin = copy.deepcopy(model)
    for module in twin.modules():
        if "forward" in vars(module):
            del module.forward
    return twin


def _compiled_vs_eager(model: torch.nn.Module, provider: str, params: list, inputs: StepInputs) -> dict[str, float]:
    """One training-mode step (dropout on) under bf16 autocast, compiled and eager from
    the same RNG state; the compiled result's relative error against the eager one."""
    model.train()

    def run():
        torch.manual_seed(CHECK_SEED)  # the dropout seeds: compiled draws what eager draws (fallback_random)
        return _loss_and_grads(model, provider, params, inputs, autocast=True)

    with torch.compiler.set_stance("force_eager"):
        want = run()
    got = run()
    return {k: rel_err(g, e) for k, g, e in zip(("logits", "loss", "grads"), got, want, strict=True)}


def check_step(model: torch.nn.Module, provider: str, params: list, inputs: StepInputs) -> dict[str, dict]:
    """The provider's logits, loss and trainable gradients on the benchmark's own batch,
    in fp32 and under bf16 autocast, against the same weights in fp32 with the plain
    reference (:data:`STEP_TOLERANCES`).  Call it inside :func:`step_towers`.

    Everything runs in eval mode (no dropout: the providers draw their masks
    differently).  The reference is the untrimmed, plain-LoRA model, so ``fused+trim``
    and ``+bucket`` are checked against the full 77-token text tower and ``fused``
    against :func:`lora_kernels.plain_lora_linear`.  A ``+half`` provider cannot run
    outside autocast (half weights, fp32 activations): its fp32 check runs on a twin
    with the fp32 originals restored, and its bf16 result must equal that twin's under
    the same autocast bit for bit (``bf16 vs fp32-stored`` = 0), which is what storing
    autocast's own rounding promises.

    A ``+compile`` provider passes those checks eager (``torch.compiler.set_stance
    ("force_eager")`` bypasses its compiled towers: compiling each eval-mode and fp32
    variant would cost minutes on a CPU), and then its compiled towers are checked
    against that eager model: one training step, dropout on, under bf16 autocast, from
    the same RNG state (``bf16 compiled vs eager``).  That training-mode bf16 graph is
    the one the benchmark then times, so the check adds no compile of its own.
    """
    from clip_lora import LoRAConfig, lora_parameters, lora_state_dict, patch_reference, unpatch
    from clip_lora.precision import restore_fp32

    half = "+half" in provider
    compiled = "+compile" in provider
    twin = restore_fp32(_eager_copy(model)) if half else model
    ref = _eager_copy(twin)
    if provider.startswith("frozen"):
        ref_params = [ref.positional_embedding, ref.visual.positional_embedding]
    else:
        adapters = lora_state_dict(twin)
        patch_reference(unpatch(ref), LoRAConfig())
        ref.load_state_dict(adapters, strict=False)
        ref_params = lora_parameters(ref)
    model.eval()
    twin.eval()
    ref.eval()
    expected = _loss_and_grads(ref, "plain", ref_params, inputs, autocast=False)
    del ref
    twin_params = params
    if half:
        by_name = dict(twin.named_parameters())
        name_of = {id(p): n for n, p in model.named_parameters()}
        twin_params = [by_name[name_of[id(p)]] for p in params]
    errs: dict[str, dict] = {}
    keys = ("logits", "loss", "grads")
    with torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext():
        got = _loss_and_grads(twin, provider, twin_params, inputs, autocast=False)
        errs["fp32"] = {k: rel_err(g, e) for k, g, e in zip(keys, got, expected, strict=True)}
        got = _loss_and_grads(model, provider, params, inputs, autocast=True)
        errs["bf16"] = {k: rel_err(g, e) for k, g, e in zip(keys, got, expected, strict=True)}
        if half:
            same = _loss_and_grads(twin, provider, twin_params, inputs, autocast=True)
            errs["bf16 vs fp32-stored"] = {k: rel_err(g, e) for k, g, e in zip(keys, got, same, strict=True)}
            del twin
    if compiled:
        errs["bf16 compiled vs eager"] = _compiled_vs_eager(model, provider, params, inputs)
    model.train()
    bad = {
        f"{precision} {k}": v
        for precision, e in errs.items()
        for k, v in e.items()
        if not v <= STEP_TOLERANCES[precision]
    }
    assert not bad, f"step {provider}: relative error vs the fp32 reference above {STEP_TOLERANCES}: {bad}"
    return errs


# =============================================================================
# Text tower alone: full / trimmed / bucketed on a dataset's class prompts
# =============================================================================

TEXT_TOLERANCE = 1e-5  # fp32, only summation orders differ (fewer keys, fewer rows): ~1e-7 measured


def build_text_model(size: str, device: torch.device, seed: int = 0) -> tuple[torch.nn.Module, list]:
    """ViT-B/16's text tower (:func:`bench.workloads.text_tower_config`), random init,
    fused LoRA on its q/k/v with non-zero B; returns (model, LoRA parameters)."""
    from open_clip.model import CLIP

    from clip_lora import LoRAConfig, lora_parameters, patch_fused

    from .workloads import text_tower_config

    torch.manual_seed(seed)
    model = CLIP(**text_tower_config(size)).to(device)
    patch_fused(model, LoRAConfig(encoder="text"))
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            if not p.abs().sum():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model, lora_parameters(model)


def text_forward(model: torch.nn.Module, provider: str, tokens: torch.Tensor) -> torch.Tensor:
    """The text features of ``tokens`` as ``provider`` computes them (not normalised)."""
    from clip_lora import encode_text_bucketed, encode_text_trimmed

    if provider == "full":
        return model.encode_text(tokens)
    if provider == "trimmed":
        return encode_text_trimmed(model, tokens)
    if provider == "bucketed":
        return encode_text_bucketed(model, tokens)
    return encode_text_bucketed(model, tokens, max_buckets=int(provider.removeprefix("bucket")), cost=0)


def make_text_step(model, provider: str, params: list, tokens: torch.Tensor, dy: torch.Tensor, dtype):
    """Forward and backward of the text tower (``dtype`` autocast, None: fp32)."""
    device_type = tokens.device.type

    def run() -> None:
        for p in params:
            p.grad = None
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = text_forward(model, provider, tokens)
        (out.float() * dy).sum().backward()

    return run


def text_reference(model, params: list, tokens: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    """Features and LoRA gradients of the full 77-token ``encode_text`` in fp32."""
    model.eval()
    for p in params:
        p.grad = None
    out = model.encode_text(tokens)
    (out * dy).sum().backward()
    ref = [out.detach().to(torch.float64), *(p.grad.to(torch.float64) for p in params)]
    for p in params:
        p.grad = None
    model.train()
    return ref


def check_text(model, provider: str, params: list, tokens: torch.Tensor, dy: torch.Tensor, ref) -> dict[str, float]:
    """The provider's fp32 features and LoRA gradients (eval mode: no dropout) against
    the full-context reference; raises when one differs by more than fp32 rounding."""
    model.eval()
    for p in params:
        p.grad = None
    out = text_forward(model, provider, tokens)
    (out * dy).sum().backward()
    got = [out, *(p.grad for p in params)]
    errs = {"features": rel_err(got[0], ref[0])}
    errs["grads"] = max(rel_err(g, r) for g, r in zip(got[1:], ref[1:], strict=True))
    for p in params:
        p.grad = None
    model.train()
    bad = {k: v for k, v in errs.items() if not v <= TEXT_TOLERANCE}
    assert not bad, f"text {provider}: relative error vs the full 77-token tower above {TEXT_TOLERANCE}: {bad}"
    return errs


def interleaved_times(runs: dict[str, Callable[[], None]], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds of each run, ``rounds`` times, round-robin.

    On a shared CPU the load drifts during a measurement; running the providers in turn,
    round after round, exposes them to the same drift, and the per-provider minimum (wall)
    and median (CPU time, which other processes do not inflate) are then comparable.
    """
    import time

    out = {name: {"wall": [], "cpu": []} for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            run()
            out[name]["cpu"].append(time.process_time() - c0)
            out[name]["wall"].append(time.perf_counter() - w0)
    return out
