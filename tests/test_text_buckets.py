"""Length-bucketed text encoding: the bucket plan is optimal, and features and gradients
equal the full 77-token ``encode_text`` on the 1000 ImageNet prompts."""

import copy
import itertools
import random

import open_clip
import pytest
import torch
import torch.nn.functional as F
from clip_models import randomize_adapters, tiny_clip, tiny_tokens
from open_clip.model import CLIP

from clip_lora import LoRAConfig, encode_text_bucketed, encode_text_trimmed, lora_parameters, patch_fused
from clip_lora.data import imagenet_classes
from clip_lora.evaluate import text_features
from clip_lora.text import (
    BUCKET_COST_TOKENS,
    GPU_BUCKET_COST_TOKENS,
    bucket_cost,
    class_prompts,
    encode_class_prompts,
    plan_buckets,
    plan_text,
    text_lengths,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm())


def _run_lengths(model):
    """Record the sequence length of every text-transformer call."""
    seen = []
    model.transformer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    return seen


# --------------------------------------------------------------------------- the plan


def _brute_force(lengths, cost, max_buckets):
    """Cheapest contiguous split of the sorted lengths, by enumerating every cut set."""
    s = sorted(lengths)
    n, best = len(s), None
    for k in range(1, (max_buckets or n) + 1):
        for cuts in itertools.combinations(range(1, n), k - 1):
            bounds = (0, *cuts, n)
            c = sum((b - a) * s[b - 1] + cost for a, b in itertools.pairwise(bounds))
            best = c if best is None else min(best, c)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_plan_is_optimal(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(3, 20) for _ in range(rng.randint(1, 9))]
    for cost, max_buckets in ((0, None), (5, None), (20, 2), (3, 3), (0, 1)):
        plan = plan_buckets(lengths, max_buckets=max_buckets, cost=cost)
        assert plan.tokens + cost * len(plan.lengths) == _brute_force(lengths, cost, max_buckets)
        assert max_buckets is None or len(plan.lengths) <= max_buckets
        # Every prompt in exactly one bucket, none longer than its bucket's context.
        assert sorted(plan.order) == list(range(len(lengths)))
        for b, L in enumerate(plan.lengths):
            members = plan.order[plan.starts[b] : plan.starts[b + 1]]
            assert members and max(lengths[i] for i in members) == L


def test_plan_imagenet_lengths():
    tokens = open_clip.get_tokenizer("ViT-B-16")(class_prompts([n for _, n in imagenet_classes()]))
    lengths = (tokens.argmax(-1) + 1).tolist()
    trimmed = max(lengths) * len(lengths)
    assert plan_buckets(lengths, max_buckets=1).tokens == trimmed
    assert plan_buckets(lengths, cost=0).tokens == sum(lengths)  # one bucket per distinct length
    chosen = plan_buckets(lengths)
    assert chosen.tokens <= 0.6 * trimmed
    # The cost model stops where one more bucket saves less than it costs.
    k = len(chosen.lengths)
    more = plan_buckets(lengths, max_buckets=k + 1, cost=0)
    assert chosen.tokens - more.tokens <= BUCKET_COST_TOKENS


def test_bucket_cost_follows_the_device():
    # Measured: on a GPU a bucket costs ~12,000 tokens of work eager (H100) and buys
    # nothing compiled (H200), so ImageNet's prompts stay one bucket there (bucketing =
    # trimming); a CPU keeps the small cost and 3 buckets.
    assert bucket_cost("cpu") == bucket_cost(torch.device("cpu")) == BUCKET_COST_TOKENS
    assert bucket_cost(torch.device("cuda")) == bucket_cost("cuda:0") == GPU_BUCKET_COST_TOKENS
    tokens = open_clip.get_tokenizer("ViT-B-16")(class_prompts([n for _, n in imagenet_classes()]))
    lengths = (tokens.argmax(-1) + 1).tolist()
    assert len(plan_buckets(lengths, cost=bucket_cost("cuda")).lengths) == 1
    assert len(plan_buckets(lengths, cost=bucket_cost("cpu")).lengths) == 3


def test_plan_text_defaults_to_the_tokens_device_cost(monkeypatch):
    """Without cost=, plan_text and encode_text_bucketed plan at bucket_cost(tokens.device)."""
    import clip_lora.text as text_mod

    model = tiny_clip(custom=False)
    tokens = tiny_tokens(12)
    seen = []
    real = text_mod.bucket_cost
    def spy(device, **k):
        seen.append((str(device), k))
        return real(device, **k)

    monkeypatch.setattr(text_mod, "bucket_cost", spy)
    plan_text(model, tokens)
    encode_text_bucketed(model, tokens)
    assert seen == [("cpu", {}), ("cpu", {})]
    seen.clear()
    plan_text(model, tokens, cost=7)
    assert seen == []  # an explicit cost is used as given


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        plan_buckets([])
    with pytest.raises(ValueError, match="max_buckets"):
        plan_buckets([3, 4], max_buckets=0)
    with pytest.raises(ValueError, match="cost"):
        plan_buckets([3, 4], cost=-1)


# --------------------------------------------------------------------------- exactness


def _imagenet_text_model(reduced: bool) -> torch.nn.Module:
    """ViT-B/16's open_clip config with a random init; ``reduced`` narrows the text
    tower to width 128, 2 layers (same tokenizer, context, causal mask and pooling) so
    the full-context reference on 1000 prompts stays affordable on a CPU."""
    cfg = copy.deepcopy(open_clip.get_model_config("ViT-B-16"))
    cfg["vision_cfg"].update(layers=1, width=64, head_width=32, image_size=32, patch_size=16)
    if reduced:
        cfg["text_cfg"].update(width=128, heads=2, layers=2)
    torch.manual_seed(0)
    model = CLIP(**cfg)
    patch_fused(model, LoRAConfig(encoder="text", params=("q", "k", "v", "o"), dropout=0.0))
    randomize_adapters(model, std=0.05)
    model.positional_embedding.requires_grad_(True)  # a non-LoRA gradient through every position
    return model.train()


def _features_and_grads(model, encode, tokens, weights):
    params = [*lora_parameters(model), model.positional_embedding]
    for p in params:
        p.grad = None
    out = encode(tokens)
    (out * weights).sum().backward()
    return out.detach(), [p.grad.clone() for p in params]


def _check_imagenet_exact(model):
    tokens = open_clip.get_tokenizer("ViT-B-16")(class_prompts([n for _, n in imagenet_classes()]))
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(len(tokens), model.text_projection.shape[1], generator=g)
    seen = _run_lengths(model)
    full = _features_and_grads(model, model.encode_text, tokens, weights)
    bucketed = _features_and_grads(model, lambda t: encode_text_bucketed(model, t), tokens, weights)
    plan = plan_buckets(text_lengths(model, tokens))
    assert len(plan.lengths) > 1 and seen == [77, *plan.lengths]
    # fp32 throughout: only summation orders differ (attention over fewer keys, GEMMs
    # over fewer rows), ~1e-7 relative; a wrong bucket or order would be O(1).
    assert _rel(bucketed[0], full[0]) < 1e-5
    for got, ref in zip(bucketed[1], full[1], strict=True):
        assert ref.abs().sum() > 0 and _rel(got, ref) < 1e-5


def test_bucketed_equals_full_context_imagenet():
    _check_imagenet_exact(_imagenet_text_model(reduced=True))


@pytest.mark.slow
def test_bucketed_equals_full_context_imagenet_vit_b16_text_tower():
    _check_imagenet_exact(_imagenet_text_model(reduced=False))


@pytest.mark.parametrize("custom", [False, True], ids=["MultiheadAttention", "open_clip.Attention"])
def test_bucketed_keeps_input_order_and_normalises(custom):
    model = patch_fused(tiny_clip(custom), LoRAConfig(dropout=0.0))
    randomize_adapters(model)
    tokens = tiny_tokens(n=9, seed=5)
    with torch.no_grad():
        ref = model.encode_text(tokens, normalize=True)
        for max_buckets in (1, 2, 3, None):
            out = encode_text_bucketed(model, tokens, normalize=True, max_buckets=max_buckets, cost=0)
            assert _rel(out, ref) < 1e-5
        perm = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(0))
        assert _rel(encode_text_bucketed(model, tokens[perm], cost=0), model.encode_text(tokens[perm])) < 1e-5


def test_one_bucket_is_the_trimmed_run():
    model = tiny_clip(custom=False)
    tokens = tiny_tokens(n=4)
    tokens[:, 6:] = 0
    tokens[:, 5] = 63  # every prompt ends at the same position: one bucket
    seen = _run_lengths(model)
    with torch.no_grad():
        out = encode_text_bucketed(model, tokens)
        assert seen == [6]
        torch.testing.assert_close(out, encode_text_trimmed(model, tokens), atol=0, rtol=0)
        seen.clear()
        varied = tiny_tokens(n=6)
        out = encode_text_bucketed(model, varied, max_buckets=1)
        assert seen == [int(varied.argmax(-1).max()) + 1]
        torch.testing.assert_close(out, encode_text_trimmed(model, varied), atol=0, rtol=0)


def test_non_causal_tower_falls_back_to_full_run():
    model = tiny_clip(custom=False)
    model.attn_mask = None  # bidirectional: neither trimming nor bucketing is exact
    tokens = tiny_tokens(n=6)
    seen = _run_lengths(model)
    with torch.no_grad():
        out = encode_text_bucketed(model, tokens, cost=0)
        assert seen == [16]
        torch.testing.assert_close(out, model.encode_text(tokens), atol=0, rtol=0)
    assert text_lengths(model, tokens) is None


def test_first_token_pooling_falls_back():
    model = tiny_clip(custom=False)
    model.text_pool_type = "first"
    tokens = tiny_tokens(n=5)
    seen = _run_lengths(model)
    with torch.no_grad():
        torch.testing.assert_close(encode_text_bucketed(model, tokens, cost=0), model.encode_text(tokens))
    assert seen == [16, 16]


# --------------------------------------------------------------------------- every caller


def test_every_text_caller_buckets(monkeypatch):
    """evaluate's text features, encode_class_prompts and the training step's loss all
    run the tower once per bucket of the plan."""
    import clip_lora.train as train

    model = patch_fused(tiny_clip(custom=False), LoRAConfig(dropout=0.0))
    monkeypatch.setattr("clip_lora.text.BUCKET_COST_TOKENS", 0)  # tiny prompts: every length its own bucket
    tokens = tiny_tokens(n=8, seed=7)
    expected = sorted(set((tokens.argmax(-1) + 1).tolist()))
    assert len(expected) > 1
    seen = _run_lengths(model)
    with torch.no_grad():
        text_features(model, tokens)
    assert seen == expected

    seen.clear()
    images = torch.randn(2, 3, 32, 32)
    loss = train._loss_sum(
        model.train(),
        images,
        torch.tensor([0, 3]),
        tokens=tokens,
        fixed_text=None,
        num_classes=len(tokens),
        train_vision=True,
        precision="fp32",
        logit_scale=100.0,
        rank=0,
        world=1,
    )
    assert seen == list(expected)
    ref = F.cross_entropy(
        100.0 * F.normalize(model.encode_image(images), dim=-1) @ F.normalize(model.encode_text(tokens), dim=-1).t(),
        torch.tensor([0, 3]),
        reduction="sum",
    )
    assert abs(loss.item() - ref.item()) < 1e-4 * abs(ref.item())


@pytest.mark.parametrize("cost", [None, 0])
def test_encode_class_prompts_buckets(monkeypatch, cost):
    model = tiny_clip(custom=False)
    vocab = {"short": [5], "long": [6, 7, 8, 9, 10, 11]}

    def tokenizer(prompts):
        out = torch.zeros(len(prompts), 16, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids = [1, *vocab[p], 63]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    if cost is not None:
        monkeypatch.setattr("clip_lora.text.BUCKET_COST_TOKENS", cost)
    seen = _run_lengths(model)
    names = ["short", "long"] * 2 + ["short"] * 28
    with torch.no_grad():
        feats = encode_class_prompts(model, tokenizer, names, template="{}")
        runs = list(seen)
        ref = model.encode_text(tokenizer(names), normalize=True)
    assert _rel(feats, ref) < 1e-5
    # 30 prompts of 3 tokens and 2 of 8: a second bucket saves 150 tokens, less than
    # the default bucket cost (one run of 8), more than a zero cost (runs of 3 and 8).
    assert BUCKET_COST_TOKENS > 150
    assert runs == ([8] if cost is None else [3, 8])


# --------------------------------------------------------------------------- a plan computed once


def _plan_free(monkeypatch):
    """Make planning an error: a call given its plan must not plan (nor sync) again."""

    def no_planning(*args, **kwargs):
        raise AssertionError("planned again although a plan was given")

    monkeypatch.setattr("clip_lora.text.plan_buckets", no_planning)


@pytest.mark.parametrize("max_buckets", [1, None])
@pytest.mark.parametrize("custom", [False, True], ids=["MultiheadAttention", "open_clip.Attention"])
def test_precomputed_plan_equals_per_call_planning(monkeypatch, custom, max_buckets):
    model = patch_fused(tiny_clip(custom), LoRAConfig(encoder="text", dropout=0.0))
    randomize_adapters(model)
    model.positional_embedding.requires_grad_(True)
    tokens = tiny_tokens(n=9, seed=5)
    weights = torch.randn(len(tokens), model.text_projection.shape[1], generator=torch.Generator().manual_seed(2))
    per_call = _features_and_grads(
        model, lambda t: encode_text_bucketed(model, t, max_buckets=max_buckets, cost=0), tokens, weights
    )
    plan = plan_text(model, tokens, max_buckets=max_buckets, cost=0)
    assert len(plan.buckets.lengths) == (1 if max_buckets else len(set(text_lengths(model, tokens))))
    assert len(plan.buckets.lengths) == 1 or len(plan.buckets.lengths) > 2  # both paths of the code
    _plan_free(monkeypatch)
    seen = _run_lengths(model)
    planned = _features_and_grads(model, lambda t: encode_text_bucketed(model, t, plan=plan), tokens, weights)
    assert seen == list(plan.buckets.lengths)
    # The same kernels on the same rows in the same order: bit for bit.
    assert torch.equal(planned[0], per_call[0])
    for got, ref in zip(planned[1], per_call[1], strict=True):
        assert ref.abs().sum() > 0 and torch.equal(got, ref)
    # And it is still the full-context result (not merely equal to another bucketed run).
    assert _rel(planned[0], model.encode_text(tokens).detach()) < 1e-5


def test_plan_that_does_not_match_the_tokens_is_refused():
    model = patch_fused(tiny_clip(custom=False), LoRAConfig(dropout=0.0))
    tokens = tiny_tokens(n=9, seed=5)
    plan = plan_text(model, tokens, cost=0)
    with pytest.raises(ValueError, match=r"computed for 9 prompts but tokens holds 5.*plan_text\(model, tokens\)"):
        encode_text_bucketed(model, tokens[:5], plan=plan)
    with pytest.raises(ValueError, match="computed for 9 prompts but tokens holds 10"):
        encode_text_bucketed(model, tiny_tokens(n=10), plan=plan)
    with pytest.raises(ValueError, match="either plan= or max_buckets=/cost="):
        encode_text_bucketed(model, tokens, plan=plan, max_buckets=2)
    with pytest.raises(TypeError, match="plan must be a TextPlan"):
        encode_text_bucketed(model, tokens, plan=plan.buckets)
    # A tower that cannot be bucketed has no plan, and refuses one.
    model.attn_mask = None
    assert plan_text(model, tokens) is None
    with pytest.raises(ValueError, match="cannot be run in buckets exactly"):
        encode_text_bucketed(model, tokens, plan=plan)


def test_loss_sum_with_a_plan_equals_per_call(monkeypatch):
    import clip_lora.train as train

    model = patch_fused(tiny_clip(custom=False), LoRAConfig(dropout=0.0)).train()
    randomize_adapters(model)
    monkeypatch.setattr("clip_lora.text.BUCKET_COST_TOKENS", 0)
    tokens = tiny_tokens(n=8, seed=7)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    kw = dict(fixed_text=None, num_classes=len(tokens), train_vision=True, precision="fp32", logit_scale=100.0)
    params = lora_parameters(model)

    def loss_and_grads(**more):
        for p in params:
            p.grad = None
        loss = train._loss_sum(model, images, labels, tokens=tokens, rank=0, world=1, **kw, **more)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    per_call = loss_and_grads()
    plan = plan_text(model, tokens)
    assert len(plan.buckets.lengths) > 1
    _plan_free(monkeypatch)
    planned = loss_and_grads(text_plan=plan)
    assert torch.equal(planned[0], per_call[0])
    assert all(torch.equal(g, r) for g, r in zip(planned[1], per_call[1], strict=True))


def test_training_plans_the_text_once_per_run(tmp_path, monkeypatch):
    """plan_buckets runs as often in a 6-iteration run as in a 1-iteration one: once for
    the training prompts, once per evaluation, never per step."""
    import json

    import clip_lora.text as text_mod
    from clip_lora.cli import DEMO_MODEL_CONFIG
    from clip_lora.data import make_synthetic
    from clip_lora.train import TrainConfig, train

    make_synthetic(str(tmp_path / "data"), num_classes=4, train_per_class=2, test_per_class=1, image_size=32)
    (tmp_path / "tiny.json").write_text(json.dumps(DEMO_MODEL_CONFIG))
    calls = []
    real = text_mod.plan_buckets
    monkeypatch.setattr(text_mod, "plan_buckets", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    counts = []
    for iterations in (1, 6):
        calls.clear()
        cfg = TrainConfig(
            dataset="synthetic", root=str(tmp_path / "data"), output=str(tmp_path / f"run{iterations}"), shots=2,
            seed=1, model=str(tmp_path / "tiny.json"), pretrained=None, batch_size=4, iterations=iterations,
            num_workers=0, checkpoint_every=0, zero_shot=False, progress=False,
        )  # fmt: skip
        assert len(train(cfg)["loss_curve"]) == iterations
        counts.append(len(calls))
    assert counts == [2, 2]  # the training plan and the final evaluation's


@pytest.mark.parametrize("compile_", [False, True])
def test_training_plans_at_the_cost_of_its_device(tmp_path, monkeypatch, compile_):
    """The training loop plans its prompts at bucket_cost(its device), eager or --compile."""
    import json

    import clip_lora.train as train_mod
    from clip_lora.cli import DEMO_MODEL_CONFIG
    from clip_lora.data import make_synthetic
    from clip_lora.train import TrainConfig, train

    make_synthetic(str(tmp_path / "data"), num_classes=4, train_per_class=2, test_per_class=1, image_size=32)
    (tmp_path / "tiny.json").write_text(json.dumps(DEMO_MODEL_CONFIG))
    seen, costs = [], []
    monkeypatch.setattr(train_mod, "bucket_cost", lambda device: (seen.append(torch.device(device)), 7)[1])
    real_plan = train_mod.plan_text
    monkeypatch.setattr(train_mod, "plan_text", lambda *a, **k: (costs.append(k.get("cost")), real_plan(*a, **k))[1])
    # The towers themselves run eager here: the wiring, not Inductor, is under test.
    monkeypatch.setattr(train_mod, "compiled_towers", lambda *a, **k: __import__("contextlib").nullcontext())
    cfg = TrainConfig(
        dataset="synthetic", root=str(tmp_path / "data"), output=str(tmp_path / "run"), shots=2, seed=1,
        model=str(tmp_path / "tiny.json"), pretrained=None, batch_size=4, iterations=1, num_workers=0,
        checkpoint_every=0, zero_shot=False, progress=False, compile=compile_,
    )  # fmt: skip
    train(cfg)
    assert seen == [torch.device("cpu")]
    assert costs == [7]  # the training plan used that cost
