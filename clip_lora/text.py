"""Text encoding that skips the padding: exact for CLIP's causal, EOT-pooled text tower.

Each text token attends only to earlier tokens, and CLIP pools the feature of the
end-of-text token (the highest token id).  Tokens after the last EOT of a batch
therefore never influence the pooled features, and the 77-token context can be cut to
the longest prompt: "a photo of a {}." is about 8 tokens, so the text tower (which
dominates a CLIP-LoRA step on ImageNet's 1000 classes) does a fraction of the work.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TEMPLATE = "a photo of a {}."


def _text_tower(model: nn.Module) -> SimpleNamespace | None:
    """The parts of a causal, EOT-pooled text tower, or None when trimming would not be exact."""
    if hasattr(model, "token_embedding") and hasattr(model, "positional_embedding"):
        # open_clip CLIP: the text tower's parts live on the model itself.
        parts = SimpleNamespace(
            embed=model.token_embedding,
            pos=model.positional_embedding,
            transformer=model.transformer,
            ln_final=model.ln_final,
            proj=model.text_projection,
            pool=model.text_pool_type,
            eos_id=getattr(model, "text_eos_id", None),
            mask=model.attn_mask,
        )
    else:
        text = getattr(model, "text", None)
        # A class token or a padding mask (CoCa, bidirectional towers) breaks the argument above.
        if text is None or not hasattr(text, "token_embedding") or text.cls_emb is not None or text.use_pad_mask:
            return None
        parts = SimpleNamespace(
            embed=text.token_embedding,
            pos=text.positional_embedding,
            transformer=text.transformer,
            ln_final=text.ln_final,
            proj=text.text_projection,
            pool=text.pool_type,
            eos_id=getattr(text, "eos_id", None),
            mask=text.attn_mask,
        )
    if parts.mask is None or parts.pool not in ("argmax", "eos"):
        return None
    return parts


def _eot_positions(parts: SimpleNamespace, tokens: torch.Tensor) -> torch.Tensor:
    if parts.pool == "argmax":
        return tokens.argmax(dim=-1)
    return (tokens == parts.eos_id).int().argmax(dim=-1)


def _encode_prefix(parts: SimpleNamespace, tokens: torch.Tensor, eot: torch.Tensor, length: int) -> torch.Tensor:
    """The tower on ``tokens[:, :length]`` (every EOT of the rows lies before ``length``),
    pooled at ``eot`` and projected; not normalised."""
    cast_dtype = parts.transformer.get_cast_dtype()
    x = parts.embed(tokens[:, :length]).to(cast_dtype) + parts.pos[:length].to(cast_dtype)
    # The sliced causal mask is still causal: LoRAAttention turns it into is_causal=True.
    x = parts.transformer(x, attn_mask=parts.mask[:length, :length])
    # LayerNorm is per token, so pooling before it gives the same features for less work.
    x = parts.ln_final(x[torch.arange(x.shape[0], device=x.device), eot])
    if isinstance(parts.proj, nn.Linear):
        x = parts.proj(x)
    elif parts.proj is not None:
        x = x @ parts.proj
    return x


def encode_text_trimmed(model: nn.Module, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``model.encode_text(tokens, normalize)``, running the text tower only up to the
    last end-of-text position in the batch.

    Works on patched and unpatched open_clip models.  Towers where trimming is not exact
    (bidirectional, class token, "first"/"last" pooling) fall back to ``encode_text``.
    """
    parts = _text_tower(model)
    if parts is None:
        return model.encode_text(tokens, normalize=normalize)
    eot = _eot_positions(parts, tokens)
    length = int(eot.max()) + 1  # one host sync per batch; it sets every shape below
    x = _encode_prefix(parts, tokens, eot, length)
    return F.normalize(x, dim=-1) if normalize else x


# --------------------------------------------------------------------------- buckets

# What one more bucket costs, in text tokens: the DP adds a bucket only where it saves
# more tokens than this.  Each bucket is one more pass through the whole tower.  On a
# CPU a token costs far more than a pass's fixed overhead, so the cost is small.  It
# was first reasoned for a GPU running CUDA graphs (the partly filled last wave of each
# GEMM, ~600 rows on 132 SMs; 512 rounds that down to a power of two), and a GPU then
# measured otherwise (GPU_BUCKET_COST_TOKENS below); on a CPU it stands: ImageNet's
# prompts (8–18 tokens, 9 distinct lengths) get 3 buckets, 9,786 tokens against 18,000
# trimmed (a 3rd bucket saves 942, a 4th 250), and EuroSAT's 10 prompts stay one run.
# bench/test_text.py shows 1, 2, 4 and 8 buckets.
BUCKET_COST_TOKENS = 512

# The same cost on a GPU, measured on ViT-B/16 with the 1000 ImageNet prompts
# (test_step_options, interleaved rounds, minimum wall time):
# - eager, H100 (2026-11-26, bench/results/NVIDIA-H100-80GB-HBM3-20261126): full context
#   77,000 tokens 124.7 ms, trimmed 18,000 tokens 51.6 ms, so a token costs 1.24 µs;
#   3 buckets (9,786 tokens) took 71.1 ms, 19.5 ms MORE than one bucket despite 8,214
#   fewer tokens (10.2 ms).  Each extra bucket cost ~14.8 ms, about 12,000 tokens: an
#   eager pass through the tower is bound by the host (Python and ~430 launches, each a
#   few µs of work at these sizes), not by the GPU.
# - compiled towers (CUDA graphs), H200 (2026-11-26, bench/results/NVIDIA-H200-20261126):
#   3 buckets at the CPU cost took 31.14 ms against 31.19 ms trimmed (0.998): the 8,214
#   tokens saved bought nothing measurable, while each bucket is one more compiled graph
#   (Inductor time and graph memory).  So compiled towers plan at the same cost.
# At this cost ImageNet's prompts stay one bucket, i.e. trimming; a bucket pays off only
# for prompt sets where it saves more than 12,000 tokens.
GPU_BUCKET_COST_TOKENS = 12_000


def bucket_cost(device: torch.device | str) -> int:
    """The per-bucket cost, in tokens, that the bucket plan uses on ``device``:
    :data:`GPU_BUCKET_COST_TOKENS` on an accelerator (eager or compiled), else
    :data:`BUCKET_COST_TOKENS`."""
    if torch.device(device).type == "cpu":
        return BUCKET_COST_TOKENS
    return GPU_BUCKET_COST_TOKENS


@dataclass(frozen=True)
class BucketPlan:
    """Prompts grouped by end-of-text position, as :func:`plan_buckets` chose them.

    ``lengths[b]`` is bucket b's trimmed context (its longest prompt); ``order`` lists
    the prompt indices sorted by length, bucket b being ``order[starts[b]:starts[b+1]]``.
    """

    lengths: tuple[int, ...]
    starts: tuple[int, ...]
    order: tuple[int, ...]

    @property
    def tokens(self) -> int:
        """Tokens the text tower processes under this plan (rows × context per bucket)."""
        return sum(n * L for n, L in zip(self.sizes, self.lengths, strict=True))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.starts[:-1], self.starts[1:], strict=True))


@functools.lru_cache(maxsize=64)
def _best_split(counts: tuple[tuple[int, int], ...], cost: float, max_buckets: int | None) -> tuple[int, ...]:
    """Cut points over the distinct lengths ``counts = ((length, n), ...)`` (ascending)
    that minimise ``Σ_buckets (rows · longest length + cost)`` with at most
    ``max_buckets`` buckets.

    Buckets are contiguous in sorted order (moving a prompt to a bucket of longer prompts
    never helps), so this is a shortest path over the U ≤ context-length distinct
    lengths: ``f[k][j] = min_i f[k−1][i] + (rows of lengths i..j−1) · length[j−1] + cost``,
    O(U² · K).  Returns the end index (exclusive, into ``counts``) of each bucket.
    """
    u = len(counts)
    k_max = u if max_buckets is None else min(max_buckets, u)
    rows = [0]
    for _, n in counts:
        rows.append(rows[-1] + n)
    inf = float("inf")
    # best[k][j]: cheapest cover of the first j distinct lengths with k buckets.
    best = [[inf] * (u + 1) for _ in range(k_max + 1)]
    back = [[0] * (u + 1) for _ in range(k_max + 1)]
    best[0][0] = 0.0
    for k in range(1, k_max + 1):
        for j in range(1, u + 1):
            length = counts[j - 1][0]
            for i in range(k - 1, j):
                c = best[k - 1][i] + (rows[j] - rows[i]) * length + cost
                if c < best[k][j]:
                    best[k][j], back[k][j] = c, i
    k = min(range(1, k_max + 1), key=lambda k: (best[k][u], k))
    cuts, j = [], u
    while k > 0:
        cuts.append(j)
        j, k = back[k][j], k - 1
    return tuple(reversed(cuts))


def plan_buckets(lengths: Sequence[int], *, max_buckets: int | None = None, cost: float | None = None) -> BucketPlan:
    """Group prompts of the given token lengths (EOT position + 1) into buckets.

    Minimises tokens processed plus ``cost`` per bucket (default :data:`BUCKET_COST_TOKENS`),
    using at most ``max_buckets`` buckets (None: as many as pay off).  ``max_buckets=1``
    is plain trimming.  Deterministic: equal lengths keep their input order.
    """
    if not lengths:
        raise ValueError("plan_buckets needs at least one prompt length")
    if max_buckets is not None and max_buckets < 1:
        raise ValueError(f"max_buckets must be >= 1 or None, got {max_buckets}")
    cost = BUCKET_COST_TOKENS if cost is None else cost
    if cost < 0:
        raise ValueError(f"cost must be >= 0 tokens, got {cost}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])  # stable
    distinct = sorted(set(lengths))
    counts = tuple((L, n) for L, n in zip(distinct, (lengths.count(L) for L in distinct), strict=True))
    cuts = _best_split(counts, float(cost), max_buckets)
    starts, bucket_lengths, row, prev = [0], [], 0, 0
    for cut in cuts:
        row += sum(n for _, n in counts[prev:cut])
        starts.append(row)
        bucket_lengths.append(counts[cut - 1][0])
        prev = cut
    return BucketPlan(tuple(bucket_lengths), tuple(starts), tuple(order))


def text_lengths(model: nn.Module, tokens: torch.Tensor) -> list[int] | None:
    """Each prompt's token count (EOT position + 1), or None where trimming is not exact."""
    parts = _text_tower(model)
    if parts is None:
        return None
    return (_eot_positions(parts, tokens) + 1).tolist()


@dataclass(frozen=True)
class TextPlan:
    """The bucket plan of one fixed batch of prompts, ready to run on its device.

    The training loop encodes the very same class prompts every step, so it plans once
    (:func:`plan_text`) and passes the plan to every :func:`encode_text_bucketed` call
    (``plan=``).  Planning reads the end-of-text positions on the host: once per run
    instead of one host sync (and one host-to-device copy of the sort order) per step,
    which also keeps the step free of data-dependent host work between CUDA-graph
    replays.  ``order`` (prompt indices sorted by length) and ``inverse`` (its inverse
    permutation) live on the tokens' device; both are None for a single bucket.
    """

    buckets: BucketPlan
    order: torch.Tensor | None
    inverse: torch.Tensor | None

    @property
    def prompts(self) -> int:
        """How many prompts the plan was computed for."""
        return len(self.buckets.order)


def _make_plan(tokens: torch.Tensor, eot: torch.Tensor, max_buckets: int | None, cost: float | None) -> TextPlan:
    cost = bucket_cost(tokens.device) if cost is None else cost
    buckets = plan_buckets((eot + 1).tolist(), max_buckets=max_buckets, cost=cost)  # the host sync
    if len(buckets.lengths) == 1:
        return TextPlan(buckets, None, None)
    order = torch.tensor(buckets.order, device=tokens.device)
    # Back to the input order: row order[i] of the output is row i of the sorted run.
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return TextPlan(buckets, order, inverse)


def plan_text(
    model: nn.Module, tokens: torch.Tensor, *, max_buckets: int | None = None, cost: float | None = None
) -> TextPlan | None:
    """The bucket plan :func:`encode_text_bucketed` would compute for ``tokens`` (one host
    sync), to be passed as its ``plan=`` on every later call with these tokens.  None
    where bucketing is not exact for ``model``'s text tower (it then runs
    ``encode_text``, and takes no plan).  ``cost`` (tokens per bucket) defaults to
    :func:`bucket_cost` of the tokens' device."""
    parts = _text_tower(model)
    if parts is None:
        return None
    return _make_plan(tokens, _eot_positions(parts, tokens), max_buckets, cost)


def _check_plan(plan: object, parts: SimpleNamespace | None, tokens: torch.Tensor, max_buckets, cost) -> None:
    if not isinstance(plan, TextPlan):
        raise TypeError(
            f"plan must be a TextPlan from clip_lora.text.plan_text(model, tokens), got {type(plan).__name__}"
        )
    if max_buckets is not None or cost is not None:
        raise ValueError("pass either plan= or max_buckets=/cost=, not both: the plan already fixes the buckets")
    if parts is None:
        raise ValueError(
            "plan= was given, but this model's text tower cannot be run in buckets exactly "
            "(plan_text returns None for it); pass plan=None"
        )
    if plan.prompts != tokens.shape[0]:
        raise ValueError(
            f"plan= was computed for {plan.prompts} prompts but tokens holds {tokens.shape[0]}; "
            "compute the plan from these very tokens with plan_text(model, tokens)"
        )
    if plan.order is not None and plan.order.device != tokens.device:
        raise ValueError(
            f"plan= lives on {plan.order.device} but tokens on {tokens.device}; "
            "compute the plan from the tokens on the device they run on"
        )


def encode_text_bucketed(
    model: nn.Module,
    tokens: torch.Tensor,
    normalize: bool = False,
    *,
    max_buckets: int | None = None,
    cost: float | None = None,
    plan: TextPlan | None = None,
) -> torch.Tensor:
    """``model.encode_text(tokens, normalize)`` with the prompts run in length buckets.

    The prompts are sorted by end-of-text position and split by :func:`plan_buckets`
    (at ``cost`` tokens per bucket, default :func:`bucket_cost` of the tokens' device);
    each bucket runs trimmed to its own longest prompt, and the features come back in
    the input order.  Exact for the same reason trimming is (causal attention, pooling
    at the EOT token), with gradients flowing through every bucket.  Towers where
    trimming is not exact fall back to ``encode_text``; one bucket is
    :func:`encode_text_trimmed`.

    ``plan``: the plan :func:`plan_text` computed once from these tokens; the call then
    plans nothing and syncs nothing.  Its prompt count and device are checked; that it
    was computed from these very tokens is the caller's promise (checking the
    end-of-text positions would be the host sync the plan exists to avoid).  Without
    it, each call plans afresh (one host sync).
    """
    parts = _text_tower(model)
    if plan is not None:
        _check_plan(plan, parts, tokens, max_buckets, cost)
    if parts is None:
        return model.encode_text(tokens, normalize=normalize)
    eot = _eot_positions(parts, tokens)
    if plan is None:
        plan = _make_plan(tokens, eot, max_buckets, cost)
    buckets = plan.buckets
    if plan.order is None:
        x = _encode_prefix(parts, tokens, eot, buckets.lengths[0])
    else:
        feats = []
        for b, length in enumerate(buckets.lengths):
            idx = plan.order[buckets.starts[b] : buckets.starts[b + 1]]
            feats.append(_encode_prefix(parts, tokens[idx], eot[idx], length))
        x = torch.cat(feats)[plan.inverse]
    return F.normalize(x, dim=-1) if normalize else x


def class_prompts(classnames: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """The paper's prompts: ``template`` filled with each class name, ``_`` as a space."""
    return [template.format(name.replace("_", " ")) for name in classnames]


def encode_class_prompts(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    template: str = DEFAULT_TEMPLATE,
    normalize: bool = True,
) -> torch.Tensor:
    """Text features ``[n_classes, embed_dim]`` of the class prompts (unit norm by
    default: the classifier weights of CLIP's zero-shot head), through the length-bucketed
    tower (:func:`encode_text_bucketed`)."""
    device = next(model.parameters()).device
    tokens = tokenizer(class_prompts(classnames, template)).to(device)
    return encode_text_bucketed(model, tokens, normalize=normalize)
