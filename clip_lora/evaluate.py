"""Test-set accuracy of a (LoRA-patched) CLIP: ``100 · cos(image, "a photo of a {class}.")``.

The same code measures zero-shot accuracy (a fresh adapter, B = 0, is the identity) and
the accuracy after training, so the two numbers differ only by the adapter.  Under
torch.distributed each rank scores a strided shard of the test set and the per-class
counts are summed, so every rank ends with the same exact numbers.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .data import ImageDataset, Sample
from .text import DEFAULT_TEMPLATE as TEMPLATE
from .text import class_prompts, encode_text_bucketed

LOGIT_SCALE = 100.0  # the paper's fixed temperature, not the checkpoint's learnt one
PRECISIONS = ("auto", "fp16", "bf16", "fp32")


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "auto" is fp16 on CUDA (the paper) and fp32 on CPU; fp16 on CPU falls back to fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        warnings.warn("fp16 autocast needs a GPU; running in fp32 on CPU", stacklevel=2)
        return "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for ``precision`` (already resolved); a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def text_features(
    model: nn.Module, tokens: torch.Tensor, *, precision: str = "fp32", chunk: int = 1024
) -> torch.Tensor:
    """L2-normalised text features of ``tokens`` (no grad), ``chunk`` prompts at a time."""
    device = tokens.device
    out = []
    with torch.no_grad(), autocast(precision, device):
        for part in tokens.split(chunk):
            out.append(encode_text_bucketed(model, part, normalize=False).float())
    return F.normalize(torch.cat(out), dim=-1)


@dataclass
class EvalResult:
    """Top-1 accuracy in percent, overall and per class in label order (None: no test images).

    A list rather than a name-keyed dict: ImageNet's CLIP names repeat ("sunglasses").
    """

    accuracy: float
    per_class: list[float | None]
    correct: int
    total: int

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "per_class": self.per_class, "correct": self.correct, "total": self.total}


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate(
    model: nn.Module,
    samples: Sequence[Sample],
    classnames: Sequence[str],
    *,
    transform: Callable,
    tokenizer: Callable,
    device: torch.device | str,
    precision: str = "auto",
    batch_size: int = 128,
    num_workers: int = 2,
    template: str = TEMPLATE,
    progress: bool = False,
) -> EvalResult:
    """Accuracy of ``model`` on ``samples`` with prompts built from ``classnames``."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    if not samples:
        raise ValueError("no test samples to evaluate")
    was_training = model.training
    model.eval()
    try:
        tokens = tokenizer(class_prompts(classnames, template)).to(device)
        txt = text_features(model, tokens, precision=precision)
        rank, world = _world()
        correct = torch.zeros(len(classnames), dtype=torch.float64, device=device)
        total = torch.zeros_like(correct)
        loader = torch.utils.data.DataLoader(
            ImageDataset(list(samples)[rank::world], transform),
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            # A private generator: creating the loader must not consume the global RNG
            # that LoRA dropout draws its seeds from (resume would diverge otherwise).
            generator=torch.Generator(),
        )
        batches = loader
        if progress and rank == 0:
            from tqdm.auto import tqdm

            batches = tqdm(loader, desc="eval", leave=False)
        for images, labels in batches:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast(precision, device):
                img = model.encode_image(images)
            img = F.normalize(img.float(), dim=-1)
            pred = (LOGIT_SCALE * img @ txt.t()).argmax(dim=-1)
            correct.index_add_(0, labels, (pred == labels).double())
            total.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        if world > 1:
            dist.all_reduce(correct)
            dist.all_reduce(total)
    finally:
        model.train(was_training)
    c, t = int(correct.sum().item()), int(total.sum().item())
    per_class = [100.0 * ci / ti if ti > 0 else None for ci, ti in zip(correct.tolist(), total.tolist(), strict=True)]
    return EvalResult(accuracy=100.0 * c / t, per_class=per_class, correct=c, total=t)
