"""The paper's few-shot training recipe (CLIP-LoRA, Zanella & Ben Ayed 2024).

One run = one dataset x shots x seed.  Defaults are the paper's fixed hyper-parameters:
AdamW (lr 2e-4, wd 1e-2, betas 0.9/0.999), cosine to 1e-6 stepped every iteration with
no warm-up, batch 32, 500 x shots iterations, fp16 autocast + GradScaler on GPU, loss
CE(100 * cos(image, text)) where every step encodes every class prompt through the
(LoRA-adapted) text tower.

The run folder receives (atomically, rank 0 only): ``config.json``, ``few_shot.json``
(the drawn training images), ``checkpoint.pt`` every ``checkpoint_every`` iterations,
``adapter.safetensors`` (+ its JSON config), ``metrics.json`` and ``train.log``.

Reproducibility: the batch order is a function of (seed, iteration), each image's
augmentation is seeded by (seed, iteration, position in the global batch), and the
checkpoint holds every rank's RNG state (LoRA dropout draws its seeds from torch's
generator), so a resumed run ends with the same adapter as an uninterrupted one.

Reliability: one process writes a run folder at a time (an ``fcntl.flock`` on
``.lock``, which the OS releases when the holder dies); a finished run is not retrained
unless ``force``; the checkpoint holds only tensors and plain values and is read with
``torch.load(weights_only=True)``; a non-finite loss stops the run with
:class:`~clip_lora.errors.DivergenceError`, keeping the last finite checkpoint and
writing no adapter.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import pickle
import random
import resource
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

from .config import LoRAConfig
from .data import (
    DatasetError,
    DatasetSplits,
    ImageDataset,
    Sample,
    canonical_name,
    check_images,
    check_shots,
    display_name,
    load_dataset,
    official_few_shot,
    save_few_shot,
)
from .errors import CheckpointError, ClipLoRAError, DivergenceError, PretrainedError, RunLockedError, reason
from .evaluate import LOGIT_SCALE, TEMPLATE, autocast, evaluate, resolve_precision, text_features
from .precision import resolve_storage, store_frozen_half
from .text import TextPlan, bucket_cost, class_prompts, encode_text_bucketed, plan_text

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RANDOM_INIT_WARNING = (
    "\n" + "!" * 78 + "\n"
    "!!  WARNING: --pretrained none: the model is RANDOMLY INITIALISED. Accuracies mean\n"
    "!!  nothing for CLIP; use --pretrained openai (the default) or a local checkpoint\n"
    "!!  path to reproduce the paper.\n" + "!" * 78
)
ADAPTER_FILE = "adapter.safetensors"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
FEW_SHOT_FILE = "few_shot.json"
CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
# Losses are copied to the host (one sync) every this many iterations and checked there.
LOSS_CHECK_EVERY = 10
# fp16 + GradScaler: a non-finite loss skips the step and halves the scale, which is
# normal.  Only this many non-finite losses in a row count as divergence: more than the
# 16 halvings that take the default scale (65536) to 1.
SCALER_PATIENCE = 20
_CHECKPOINT_KEYS = (
    "iteration", "recipe", "trainable", "optimizer", "scheduler", "scaler", "rng", "losses", "zero_shot",
    "train_seconds",
)  # fmt: skip

# Settings that do not change the numbers: a resumed run may differ in these.
# allow_activation_mismatch is a permission; "activation" is the setting that changes the numbers.
_NON_RECIPE_FIELDS = {"output", "root", "num_workers", "checkpoint_every", "progress", "eval_batch_size", "device"}
_NON_RECIPE_FIELDS |= {"allow_activation_mismatch"}


@dataclass
class TrainConfig:
    """One CLIP-LoRA run; every default is the paper's.

    Attributes:
        dataset: a dataset name (see ``clip_lora.data.LAYOUTS``), or "folder".
        root: the data root ($DATA), or the dataset folder itself for "folder".
        output: the run folder.
        shots: images per class; seed: the few-shot draw and every random stream.
        model / pretrained: open_clip name (or a model-config JSON path, see
            ``register_model_config``) and weights: "openai" (the paper, the default),
            another open_clip tag, a checkpoint path, or None for a random init (warns loudly).
        activation / allow_activation_mismatch: the MLP activation, "auto" (what the
            weights were trained with: QuickGELU for OpenAI's), "quickgelu" or "gelu"; see
            ``clip_lora.model.create_model``.
        image_size: override the model's input size (small CPU runs only).
        lora: where adapters go and their rank/alpha/dropout/scaling.
        fused: fused Triton kernels (True) or the plain PyTorch LoRA provider.
        lr, weight_decay, betas: AdamW; eta_min: the cosine schedule's floor.
        batch_size: the global batch (split across processes under torchrun).
        iters_per_shot / iterations: total iterations are ``iters_per_shot * shots``
            unless ``iterations`` is given.
        precision: "auto" (fp16 + GradScaler on GPU, fp32 on CPU), "fp16", "bf16", "fp32".
        logit_scale / template: the loss temperature and the class prompt.  None (the
            default): the paper's 100 on CLIP models (OpenAI's CLIP learnt exactly that
            scale), the model's own ``logit_scale.exp()`` on other families (SigLIP, EVA,
            PE-Core, ...; see :func:`default_logit_scale`).
        checkpoint_every: iterations between resumable checkpoints (0: never).
        zero_shot: measure test accuracy before training as well.
        compile: run the towers' forward and backward through ``torch.compile``
            (CUDA graphs on a GPU); see :func:`compiled_towers`.
    """

    dataset: str
    root: str
    output: str
    shots: int = 16
    seed: int = 1
    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    activation: str = "auto"
    allow_activation_mismatch: bool = False
    image_size: int | None = None
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    fused: bool = True
    lr: float = 2e-4
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eta_min: float = 1e-6
    batch_size: int = 32
    iters_per_shot: int = 500
    iterations: int | None = None
    precision: str = "auto"
    logit_scale: float | None = None
    template: str = TEMPLATE
    eval_batch_size: int = 128
    num_workers: int = 4
    checkpoint_every: int = 500
    zero_shot: bool = True
    device: str | None = None
    progress: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        canonical_name(self.dataset)  # an unknown name fails here, before anything is built or written
        check_shots(self.shots)
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig.from_dict(self.lora)
        self.betas = tuple(self.betas)
        for name in ("batch_size", "iters_per_shot", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.eta_min <= self.lr:
            raise ValueError("need lr > 0, weight_decay >= 0 and 0 <= eta_min <= lr")
        if self.checkpoint_every < 0 or self.num_workers < 0:
            raise ValueError("checkpoint_every and num_workers must be >= 0")
        if self.image_size is not None and (
            isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1
        ):
            raise ValueError(
                f"image_size must be a positive number of pixels (or None: the model's), got {self.image_size!r}"
            )
        if not isinstance(self.compile, bool):
            raise TypeError(f"compile must be True or False, got {self.compile!r}")
        if self.logit_scale is not None and (
            not isinstance(self.logit_scale, (int, float))
            or not (math.isfinite(self.logit_scale) and self.logit_scale > 0)
        ):
            raise ValueError(f"logit_scale must be a finite number > 0 or None (the default), got {self.logit_scale!r}")
        if "{}" not in self.template:
            raise ValueError(f"template must contain '{{}}' for the class name, got {self.template!r}")
        resolve_precision(self.precision, torch.device("cpu"))  # validates the name only

    @property
    def total_iterations(self) -> int:
        return self.iterations if self.iterations is not None else self.iters_per_shot * self.shots

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora"] = self.lora.to_dict()
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        return cls(**d)

    def recipe(self) -> dict[str, Any]:
        """The fields that determine the numbers (checked when resuming)."""
        return {k: v for k, v in self.to_dict().items() if k not in _NON_RECIPE_FIELDS}


# --------------------------------------------------------------------------- helpers


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def register_model_config(model: str) -> str:
    """Accept a path to an open_clip model-config JSON as ``model``: register it, return its name."""
    if model.endswith(".json") and os.path.isfile(model):
        import open_clip

        open_clip.add_model_config(model)
        return os.path.splitext(os.path.basename(model))[0]
    return model


def train_transform(image_size: int | tuple[int, int], mean=CLIP_MEAN, std=CLIP_STD) -> Callable:
    """The paper's augmentation: RandomResizedCrop(scale 0.08-1, bicubic), flip, CLIP mean/std."""
    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(p=0.5),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


class BatchPlan:
    """Which images make up iteration ``it``'s global batch, and their augmentation seeds.

    Epochs are seeded permutations of the few-shot set; the last batch of an epoch may
    be short (the official loader keeps it: ``drop_last=False``).  Everything is a pure
    function of (seed, iteration), so resuming needs no sampler state.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = math.ceil(n / batch_size)
        self._epoch, self._perm = -1, None

    def smallest_batch(self) -> int:
        return self.n - (self.per_epoch - 1) * self.batch_size

    def batch(self, it: int) -> list[tuple[int, int]]:
        epoch, j = divmod(it, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        idx = self._perm[j * self.batch_size : (j + 1) * self.batch_size]
        base = (self.seed * 1_000_003 + it) * 4096
        return [(i, (base + pos) % (2**62)) for pos, i in enumerate(idx)]


class _RankBatches(torch.utils.data.Sampler):
    """This rank's contiguous slice of each global batch, for iterations ``start..stop-1``."""

    def __init__(self, plan: BatchPlan, start: int, stop: int, rank: int, world: int):
        self.plan, self.start, self.stop, self.rank, self.world = plan, start, stop, rank, world

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for it in range(self.start, self.stop):
            batch = self.plan.batch(it)
            lo, hi = _shard_bounds(len(batch), self.rank, self.world)
            yield batch[lo:hi]


def _shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous split of n items into ``world`` parts, sizes differing by at most one."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class _GatherRows(torch.autograd.Function):
    """All-gather equal-sized row blocks; backward sums the gradient over ranks and keeps
    this rank's block (rank r's text features enter every rank's logits)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def _rng_state() -> dict[str, Any]:
    """This process's RNG streams as tensors and plain values (``weights_only`` loadable)."""
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(internal, dtype=torch.int64),
        "python_version": version,
        "python_gauss": gauss,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunLock:
    """One writer per run folder: an exclusive ``fcntl.flock`` on ``<folder>/.lock``.

    The OS drops the lock when the holder's process ends, however it ends, so a lock
    file left by a killed run never blocks its resume.  The file holds the holder's pid
    for the error message only; it is never deleted (deleting a locked file would let a
    third process lock a new file of the same name).
    """

    def __init__(self, folder: str):
        self.folder, self.path, self._fd = folder, os.path.join(folder, LOCK_FILE), None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"run folder {self.folder} is in use by another clip-lora process (pid {holder}); "
                "wait for it to finish or stop it, or use another --output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def remove_stray_temp_files(folder: str) -> list[str]:
    """Delete the ``*.tmp*`` files that writes killed between "write temp" and "rename"
    left in ``folder``; call only while holding the folder's :class:`RunLock`."""
    removed = []
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False) and ".tmp" in entry.name:
            os.unlink(entry.path)
            removed.append(entry.name)
    return sorted(removed)


def read_checkpoint(path: str) -> dict[str, Any]:
    """A run's ``checkpoint.pt``, read with ``weights_only=True`` (no code runs on load);
    a truncated, corrupt or foreign file raises :class:`CheckpointError`."""
    fix = "delete it to restart the run from the beginning, or use another --output"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason(e)}); {fix}") from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a clip-lora checkpoint (no {', '.join(missing)}); {fix}")
    return ckpt


def _broadcast(value: Any, world: int) -> Any:
    """Rank 0's ``value`` on every rank (a no-op in one process)."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _on_rank0(fn: Callable[[], Any], world: int, rank: int) -> Any:
    """Run ``fn`` on rank 0 only and give every rank its result; if it raised a one-line
    error, every rank raises it (the others would otherwise wait forever in the next
    collective)."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except (ClipLoRAError, DatasetError, ValueError) as e:
            if world == 1:
                raise
            error = e
    result, error = _broadcast((result, error), world)
    if error is not None:
        raise error
    return result


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    # ru_maxrss is in KiB on Linux: the process's peak resident memory (model + data + Python).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"


class _Log:
    """Lines to the console (above the progress bar) and to ``train.log``; rank 0 only."""

    def __init__(self, path: str | None):
        self.path = path

    def __call__(self, msg: str) -> None:
        if self.path is None:
            return
        from tqdm.auto import tqdm

        tqdm.write(msg, file=sys.stderr)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(msg + "\n")


def init_distributed() -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether we created the process group) under torchrun.

    NCCL on GPU, gloo on CPU.  Without torchrun's environment: one process.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return 0, 1, device, False
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
        created = True
    if not cuda:
        # N processes on one CPU: do not oversubscribe the cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return dist.get_rank(), dist.get_world_size(), device, created


def _check_pretrained_source(model: str, pretrained: str) -> None:
    """A ``pretrained`` that is neither a file nor one of open_clip's tags for ``model``
    fails here, before anything is built."""
    import open_clip

    if os.path.isdir(pretrained):
        raise PretrainedError(f"--pretrained {pretrained} is a directory: give the checkpoint file inside it")
    if os.path.exists(pretrained):
        return
    tags = open_clip.list_pretrained_tags_by_model(model) if model in open_clip.list_models() else []
    if pretrained in tags or pretrained.startswith(("hf-hub:", "local-dir:")) or model.startswith("hf-hub:"):
        return
    raise PretrainedError(
        f"--pretrained {pretrained}: no such file, and not an open_clip tag for {model} "
        f"(tags: {', '.join(tags) or 'none'}); give a tag such as 'openai', or the path of a {model} checkpoint"
    )


def create_checked_model(
    model: str, pretrained: str | None, *, lora: LoRAConfig | None, fused: bool = True, **kwargs: Any
) -> tuple[nn.Module, Callable, Callable, Callable]:
    """:func:`clip_lora.create_model`, with a bad ``pretrained`` (missing, garbage, another
    architecture, other keys, non-finite values) reported as one :class:`PretrainedError`
    that names the file, instead of open_clip's traceback."""
    from .model import _check_model_name, choose_activation, create_model, resolve_weights

    name = register_model_config(model)
    if pretrained is not None:
        _check_pretrained_source(_check_model_name(name), pretrained)
    # Weights that are not there, or an activation they were not trained with, get their
    # own messages here rather than the generic "cannot be loaded" below.
    allow_mismatch = kwargs.get("allow_activation_mismatch", False)
    choose_activation(name, resolve_weights(name, pretrained), kwargs.get("activation", "auto"), allow_mismatch)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Mm]odel initialized randomly.*")
        try:
            out = create_model(name, pretrained=pretrained, lora=lora, fused=fused, **kwargs)
        except (RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError, OSError) as e:
            if pretrained is None or isinstance(e, ClipLoRAError) or str(e).startswith("unknown open_clip model"):
                raise
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            detail = " ".join(lines[:2])[:300]
            raise PretrainedError(
                f"--pretrained {pretrained} cannot be loaded into {name} ({type(e).__name__}: {detail}); "
                f"give a checkpoint of {name} (or an open_clip tag such as 'openai'), or pick the matching --model"
            ) from None
    if pretrained is not None:
        bad = [n for n, p in out[0].named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
        if bad:
            raise PretrainedError(
                f"--pretrained {pretrained} holds non-finite values (NaN or inf) in {len(bad)} tensors "
                f"(e.g. {bad[0]}); the checkpoint is corrupt: download or export it again"
            )
    return out


def build_model(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, Callable, Callable]:
    """The LoRA-patched open_clip model, its test transform and tokenizer; seeded, so a
    random-init model is the same on every rank and in every run."""
    if cfg.pretrained is None:
        print(RANDOM_INIT_WARNING, file=sys.stderr)
    kwargs = {"force_image_size": cfg.image_size} if cfg.image_size is not None else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model, _, preprocess_val, tokenizer = create_checked_model(
            cfg.model,
            cfg.pretrained,
            lora=cfg.lora,
            fused=cfg.fused,
            activation=cfg.activation,
            allow_activation_mismatch=cfg.allow_activation_mismatch,
            **kwargs,
        )
    # fp16/bf16: the frozen projections stored once in that dtype, not cast every call (clip_lora.precision).
    model = store_frozen_half(model.to(device), resolve_storage(cfg.precision, device))
    return model, preprocess_val, tokenizer


def default_logit_scale(model: nn.Module) -> tuple[float, str]:
    """The loss temperature when none is given, and where it came from.

    The paper's fixed 100 is CLIP's own learnt logit scale (clamped at 100 in training),
    so it applies to CLIP models: open_clip's own ViT or ResNet vision tower with its own
    text tower.  Other families learnt other temperatures; theirs is ``logit_scale.exp()``
    (cross-entropy over classes ignores SigLIP's logit bias: it shifts every class alike).
    """
    from .families import families

    fams = families(model)
    if fams.get("text") == "open_clip" and fams.get("vision") in ("open_clip", "resnet"):
        return LOGIT_SCALE, "paper (CLIP)"
    return float(model.logit_scale.detach().float().exp()), "model.logit_scale.exp()"


# --------------------------------------------------------------------------- training


def _loss_sum(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    tokens: torch.Tensor | None,
    fixed_text: torch.Tensor | None,
    num_classes: int,
    train_vision: bool,
    precision: str,
    logit_scale: float,
    rank: int,
    world: int,
    text_plan: TextPlan | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of this rank's images against all class prompts.

    ``text_plan``: the bucket plan of this rank's shard of ``tokens``
    (:func:`clip_lora.text.plan_text`, computed once per run); None plans it afresh.

    Text work under torchrun: each rank encodes only its contiguous shard of the class
    prompts and the features are all-gathered (``_GatherRows``).  That is exact, not an
    approximation: the loss is a sum over ranks' images, every rank's logits need all C
    text features, and the gather's backward sums each shard's feature gradient over
    ranks, so rank r back-propagates d(global loss)/d(its shard) through the text tower;
    summing the LoRA gradients over ranks then gives the single-process gradient.  The
    alternative, every rank encoding all C prompts, repeats the text tower (which
    dominates an ImageNet step: 1000 prompts vs 32 images) world-size times for nothing.
    """
    device = images.device
    with autocast(precision, device):
        if tokens is not None:
            lo, hi = _shard_bounds(num_classes, rank, world)
            rows = math.ceil(num_classes / world)
            txt = F.normalize(encode_text_bucketed(model, tokens[lo:hi], plan=text_plan).float(), dim=-1)
            if world > 1:
                # Pad to equal blocks for all_gather; the padding rows are sliced away again.
                txt = _GatherRows.apply(F.pad(txt, (0, 0, 0, rows - (hi - lo))))
                txt = torch.cat([txt[r * rows : r * rows + (b - a)] for r, (a, b) in _all_bounds(num_classes, world)])
        else:
            txt = fixed_text
        with torch.set_grad_enabled(train_vision):
            img = model.encode_image(images)
    img = F.normalize(img.float(), dim=-1)
    logits = logit_scale * img @ txt.t()
    return F.cross_entropy(logits, labels, reduction="sum")


def _all_bounds(n: int, world: int) -> list[tuple[int, tuple[int, int]]]:
    return [(r, _shard_bounds(n, r, world)) for r in range(world)]


def _all_reduce_grads(params: Sequence[nn.Parameter]) -> None:
    """Sum the LoRA gradients over ranks in one flat all-reduce.

    Why not wrap in DistributedDataParallel: DDP's value is overlapping many bucketed
    all-reduces with the backward of a large model; here the trainable set is a few
    hundred thousand floats, and one all-reduce after backward keeps every collective
    (this one and the text gather's) in a fixed order on all ranks.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


class DivergenceWatch:
    """Decides from the host copies of the losses whether a run has diverged.

    ``patience`` is how many non-finite losses in a row are tolerated: 0 without a
    GradScaler (any NaN/inf loss is divergence: the optimiser step has already spread it
    into the adapters), :data:`SCALER_PATIENCE` with fp16 + GradScaler (the scaler skips
    such steps and lowers its scale; only a loss that stays non-finite beyond that
    recovery counts).
    """

    def __init__(self, patience: int = 0):
        self.patience, self.run, self.start = patience, 0, None

    def update(self, losses: Sequence[float], first: int) -> int | None:
        """Feed the losses of iterations ``first, first + 1, ...`` (1-based); returns the
        iteration where the divergence began, or None."""
        for i, value in enumerate(losses):
            if math.isfinite(value):
                self.run, self.start = 0, None
                continue
            if self.run == 0:
                self.start = first + i
            self.run += 1
            if self.run > self.patience:
                return self.start
        return None


def _few_shot(cfg: TrainConfig, data: DatasetSplits, main: bool) -> list[Sample]:
    if not data.train:
        raise DatasetError(f"{cfg.dataset}: the train split is empty; add training images")
    counts = Counter(s.label for s in data.train)
    # A partial ImageNet (absent wnid folders) keeps all 1000 classes in its classifier, as the paper does.
    if data.name != "imagenet":
        empty = [data.classnames[i] for i in range(data.num_classes) if counts[i] == 0]
        if empty:
            raise DatasetError(
                f"{cfg.dataset}: class {empty[0]!r} has no training images"
                + (f" (nor do {len(empty) - 1} other classes)" if len(empty) > 1 else "")
                + "; add training images for it, or remove the class"
            )
    few = [(data.classnames[label], n) for label, n in sorted(counts.items()) if n < cfg.shots]
    if few and main:
        name, n = few[0]
        warnings.warn(
            f"class {name!r} has {n} training images, fewer than --shots {cfg.shots}"
            + (f" (and {len(few) - 1} more classes)" if len(few) > 1 else "")
            + ": the sampler repeats images to fill its shots, as CoOp does",
            stacklevel=3,
        )
    # The official code's draw for this seed (its validation draw included), so seed k
    # trains on the very images the official seed k does.
    return official_few_shot(data.train, data.val, cfg.shots, cfg.seed, imagenet=data.name == "imagenet")


def _finished_metrics(cfg: TrainConfig) -> dict[str, Any] | None:
    """The metrics of a finished run in ``cfg.output`` (None: not finished); a finished
    run of another configuration is an error rather than a silent skip."""
    metrics_path = os.path.join(cfg.output, METRICS_FILE)
    if not os.path.isfile(metrics_path):
        return None
    try:
        with open(os.path.join(cfg.output, CONFIG_FILE), encoding="utf-8") as f:
            saved = TrainConfig.from_dict(json.load(f)).recipe()
        with open(metrics_path, encoding="utf-8") as f:
            metrics = json.load(f)
    except (OSError, ValueError, TypeError):
        return None  # unreadable: not a finished run of ours, train it
    ours = cfg.recipe()
    if saved != ours:
        diff = sorted(k for k in ours if saved.get(k) != ours[k])
        raise ValueError(
            f"{cfg.output} holds a finished run of a different configuration (differs in {diff}); "
            "use --force to retrain it with this one, or another --output"
        )
    return metrics


def train(cfg: TrainConfig, *, stop_after: int | None = None, force: bool = False) -> dict[str, Any]:
    """Run (or resume) one CLIP-LoRA training; returns the metrics written to ``metrics.json``.

    ``stop_after``: stop once that many iterations are done and checkpointed, as if the
    job had been killed there (returns ``{"interrupted": True, ...}``); calling
    ``train`` again on the same folder resumes.  A folder that holds a finished run of
    the same configuration is not retrained: its metrics come back with
    ``"already_finished": True``, unless ``force`` (which starts over).

    Raises :class:`~clip_lora.errors.RunLockedError` if another process writes to the
    folder, and :class:`~clip_lora.errors.DivergenceError` if the loss becomes non-finite.
    """
    from .model import choose_activation, resolve_weights

    # Missing weights or a wrong activation fail here, before any data is read or written.
    name = register_model_config(cfg.model)
    choose_activation(name, resolve_weights(name, cfg.pretrained), cfg.activation, cfg.allow_activation_mismatch)
    rank, world, device, created_group = init_distributed()
    if cfg.device:
        device = torch.device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    try:
        return _claim_and_train(cfg, rank, world, device, precision, stop_after, force)
    finally:
        if created_group:
            dist.destroy_process_group()


def _claim_and_train(cfg, rank, world, device, precision, stop_after, force) -> dict[str, Any]:
    """Lock the run folder (rank 0), clean it up, skip a finished run, then train."""
    lock = RunLock(cfg.output)

    def claim() -> tuple[list[str], dict[str, Any] | None]:
        os.makedirs(cfg.output, exist_ok=True)
        lock.acquire()
        try:
            removed = remove_stray_temp_files(cfg.output)
            if force:
                for name in (METRICS_FILE, ADAPTER_FILE, CHECKPOINT_FILE):
                    if os.path.exists(path := os.path.join(cfg.output, name)):
                        os.unlink(path)
                return removed, None
            return removed, _finished_metrics(cfg)
        except BaseException:
            lock.release()
            raise

    removed, finished = _on_rank0(claim, world, rank)
    try:
        log = _Log(os.path.join(cfg.output, "train.log") if rank == 0 else None)
        if removed:
            log(f"removed {len(removed)} temporary file(s) left by an interrupted write: {', '.join(removed)}")
        if finished is not None:
            log(
                f"{cfg.output} is already finished (test accuracy {finished.get('accuracy', float('nan')):.2f}%); "
                "not retraining (--force retrains)"
            )
            return {**finished, "already_finished": True}
        return _train(cfg, rank, world, device, precision, stop_after, log)
    finally:
        lock.release()


# --------------------------------------------------------------------------- --compile

# Graphs allowed per compiled tower and run.  Shapes are static (dynamic=False), so each
# distinct input shape is its own graph: the vision tower's full and short last batch
# (and, under torchrun, the shard sizes), one per text bucket length, with and without
# grad.  A few dozen at most; past the limit fullgraph=True raises instead of silently
# running eager.
COMPILE_RECOMPILE_LIMIT = 64


@contextlib.contextmanager
def _dynamo_recompile_limit(limit: int) -> Iterator[None]:
    """Dynamo's process-wide graphs-per-function limit raised to ``limit`` within the block
    (for torch releases whose ``torch.compile`` takes no ``recompile_limit``); restored on exit."""
    import torch._dynamo.config as dynamo_config

    # The option was renamed from cache_size_limit; each release has one of the two names.
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    before = getattr(dynamo_config, name)
    setattr(dynamo_config, name, max(before, limit))
    try:
        yield
    finally:
        setattr(dynamo_config, name, before)


def compile_targets(model: nn.Module) -> dict[str, nn.Module]:
    """The modules ``--compile`` compiles, by name: open_clip's own vision tower (ViT or
    ResNet), and its text tower's block stack (the embedding, pooling and projection stay
    eager: a few small kernels).  Other families' towers (timm, Hugging Face) stay eager:
    that they trace whole under ``fullgraph=True`` is not tested."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import TextTransformer, Transformer, VisionTransformer

    targets = {}
    if isinstance(getattr(model, "visual", None), (VisionTransformer, ModifiedResNet)):
        targets["visual"] = model.visual
    if hasattr(model, "token_embedding") and isinstance(getattr(model, "transformer", None), Transformer):
        targets["transformer"] = model.transformer  # open_clip CLIP: the text tower lives on the model
    elif isinstance(getattr(model, "text", None), TextTransformer):
        targets["text.transformer"] = model.text.transformer  # CustomTextCLIP with open_clip's text tower
    return targets


def compile_options(device: torch.device) -> dict[str, Any]:
    """Inductor options for ``--compile`` on ``device``.

    ``fallback_random``: random ops in the graph call ATen's, as eager does, instead of
    Inductor's own Philox stream.  The only random op in the towers is the dropout seed
    (``lora_kernels.draw_seed``: one scalar ``torch.randint`` per projection and step;
    the masks are hashed from it inside the kernels), so this costs nothing, and a
    compiled step draws the very seeds, hence masks, that the eager step draws.

    On CUDA, ``reduce-overhead``'s CUDA graphs: every step has the same shapes (same
    batch, same text buckets), so each graph is captured once and replayed.  Why the
    layer can be captured: the fused op's CUDA path launches Triton kernels on the
    current stream with no host sync (the seed is read on the device, ``tl.load``),
    allocates only through the caching allocator (the graph's private pool), and the
    dropout seed is ATen's CUDA ``randint``, which is capture-safe: under capture it
    reads the generator's seed and offset from device memory, and every replay advances
    the offset, so each step gets fresh seeds.  The warm-up and recording calls consume
    the generator as one eager call each, so a resumed run (RNG state restored from the
    checkpoint) draws the seeds an uninterrupted run draws.  Ran on an H100 (the step
    options benchmark, 2026-11-26: compiled losses and gradients within bf16 rounding of
    eager); that a resumed compiled run redraws the same seeds is reasoned, not measured.
    """
    import torch._inductor

    options: dict[str, Any] = {"fallback_random": True}
    if device.type == "cuda":
        options.update(torch._inductor.list_mode_options("reduce-overhead"))
    return options


@contextlib.contextmanager
def compiled_towers(model: nn.Module, device: torch.device, *, backend: str | Callable = "inductor") -> Iterator[None]:
    """Within the block, the towers of ``model`` run through ``torch.compile``.

    What is compiled, and why not the whole step: :func:`train_step` calls
    ``loss.backward()``, the GradScaler (which reads ``found_inf`` on the host), the
    LR scheduler (a Python float every step) and, under torchrun, collectives; the
    text path runs one tower call per bucket, its lengths planned on the host (once
    per run, :func:`clip_lora.text.plan_text`).  None of that traces into one
    graph, so ``fullgraph=True`` on the step cannot hold.  The towers are where the
    time goes (every LoRA projection, attention and MLP, forward and backward through
    AOTAutograd) and they trace whole: ``fullgraph=True`` makes any graph break an
    error rather than a silent slowdown.  ``dynamic=False``: one graph per shape, which
    is what CUDA graphs need; a short last batch is one more graph.

    How: each target's ``forward`` is swapped, on the instance, for its compiled
    version, and restored on exit.  The module tree is untouched (no ``_orig_mod.``
    wrapper), so parameter names, ``state_dict`` keys, checkpoints and saved adapters
    are those of the eager model; the evaluation outside the block runs eager.  On exit,
    ``torch.compiler.reset()`` (see the comment there).
    """
    targets = list(compile_targets(model).values())
    kwargs: dict[str, Any] = {"fullgraph": True, "dynamic": False, "backend": backend}
    if backend == "inductor":
        kwargs["options"] = compile_options(device)
    per_call = "recompile_limit" in inspect.signature(torch.compile).parameters
    if per_call:
        kwargs.update(recompile_limit=COMPILE_RECOMPILE_LIMIT, isolate_recompiles=True)
    # Older torch (2.11, say) has no per-call limit: raise Dynamo's global one for the block.
    limits = contextlib.nullcontext() if per_call else _dynamo_recompile_limit(COMPILE_RECOMPILE_LIMIT)
    with limits:
        for module in targets:
            module.forward = torch.compile(module.forward, **kwargs)
        try:
            yield
        finally:
            for module in targets:
                if "forward" in vars(module):
                    del module.forward
            # Drop the compiled graphs (and CUDA-graph pools): the next run in this process
            # (``reproduce`` trains many) has new modules and compiles afresh, while entries
            # of dead models would still count toward Dynamo's accumulated recompile limit,
            # a hard error under fullgraph=True after a few dozen runs.  This resets every
            # torch.compile cache of the process, the caller's included.
            torch.compiler.reset()


def train_step(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    global_batch: int,
    params: Sequence[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    world: int = 1,
    cuda_graphs: bool = False,
) -> torch.Tensor:
    """One optimisation step; returns the global batch's mean loss (on the device, no sync).

    ``loss_fn(images, labels)`` is this rank's summed loss.  Each rank's share of the
    global mean is back-propagated, the LoRA gradients are summed over ranks, then the
    scaler (fp16) steps the optimiser and the schedule advances.  ``cuda_graphs``: the
    towers replay CUDA graphs (:func:`compiled_towers` on CUDA); the step boundary is
    marked so that their outputs of the previous step may be overwritten.
    """
    if cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()
    loss = loss_fn(images, labels) / global_batch
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if world > 1:
        _all_reduce_grads(params)
        loss = loss.detach().clone()
        dist.all_reduce(loss)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.detach()


def _train(cfg, rank, world, device, precision, stop_after, log) -> dict[str, Any]:
    from .adapters import save_adapter
    from .model import mlp_activation
    from .patch import lora_parameters

    main = rank == 0
    ckpt_path = os.path.join(cfg.output, CHECKPOINT_FILE)
    ckpt = read_checkpoint(ckpt_path) if os.path.exists(ckpt_path) else None
    if ckpt is not None:
        ckpt["recipe"] = {"compile": False, **ckpt["recipe"]}  # written before --compile existed
    if ckpt is not None and ckpt["recipe"] != cfg.recipe():
        diff = sorted(k for k in cfg.recipe() if ckpt["recipe"].get(k) != cfg.recipe()[k])
        raise ValueError(
            f"{ckpt_path} was written by a different configuration (differs in {diff}); "
            "use another --output folder, or --force to start over"
        )
    if ckpt is not None and len(ckpt["rng"]) != world:
        raise CheckpointError(
            f"checkpoint {ckpt_path} holds {len(ckpt['rng'])} ranks' RNG state; resume with that many processes"
        )

    # ---- setup: data (every image checked before the model is built), model, optimiser
    data = load_dataset(cfg.dataset, cfg.root)
    shots = _few_shot(cfg, data, main)
    total = cfg.total_iterations
    plan = BatchPlan(len(shots), min(cfg.batch_size, len(shots)), cfg.seed)
    if world > data.num_classes and cfg.lora.encoder != "vision":
        raise ValueError(f"{world} processes but only {data.num_classes} classes to share the text tower between")
    if plan.smallest_batch() < world:
        raise ValueError(
            f"{world} processes but some batches hold only {plan.smallest_batch()} images; "
            "use fewer processes or more shots"
        )
    _on_rank0(lambda: (check_images(shots, "training"), check_images(data.test, "test")), world, rank)
    if main:
        write_json(os.path.join(cfg.output, CONFIG_FILE), cfg.to_dict())
        save_few_shot(
            os.path.join(cfg.output, FEW_SHOT_FILE),
            shots,
            image_root=data.image_root,
            dataset=data.name,
            shots=cfg.shots,
            seed=cfg.seed,
        )
        log(
            f"{display_name(cfg.dataset)}: {data.num_classes} classes, {len(shots)} training images "
            f"({cfg.shots} shots, seed {cfg.seed}), {len(data.test)} test images; {total} iterations, "
            f"batch {plan.batch_size} over {world} process(es), {precision} on {device.type}, "
            f"{'fused' if cfg.fused else 'plain'} LoRA {cfg.lora.to_dict()}"
            + (", towers compiled (torch.compile)" if cfg.compile else "")
        )

    model, preprocess_val, tokenizer = build_model(cfg, device)
    if cfg.logit_scale is None:
        logit_scale, logit_scale_source = default_logit_scale(model)
    else:
        logit_scale, logit_scale_source = float(cfg.logit_scale), "given"
    params = lora_parameters(model)
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for p in params]
    train_text = cfg.lora.encoder in ("text", "both")
    train_vision = cfg.lora.encoder in ("vision", "both")
    tokens = tokenizer(class_prompts(data.classnames, cfg.template)).to(device)
    image_size = model.visual.image_size
    # open_clip records each checkpoint's normalisation; OpenAI weights use CLIP's mean/std.
    mean = getattr(model.visual, "image_mean", None) or CLIP_MEAN
    std = getattr(model.visual, "image_std", None) or CLIP_STD

    def run_eval() -> dict[str, Any]:
        return evaluate(
            model,
            data.test,
            data.classnames,
            transform=preprocess_val,
            tokenizer=tokenizer,
            device=device,
            precision=precision,
            batch_size=cfg.eval_batch_size,
            num_workers=cfg.num_workers,
            template=cfg.template,
            progress=cfg.progress,
        ).to_dict()

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total, eta_min=cfg.eta_min)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    if ckpt is None:
        start, losses, train_seconds, last_checkpoint = 0, [], 0.0, None
        zero_shot = run_eval() if cfg.zero_shot else None
        if main and zero_shot:
            log(f"zero-shot test accuracy: {zero_shot['accuracy']:.2f}%")
        # The training stream (LoRA dropout seeds) per rank, independent of anything above.
        torch.manual_seed(cfg.seed * 7919 + rank)
        random.seed(cfg.seed * 7919 + rank)
    else:
        start, losses, train_seconds = ckpt["iteration"], list(ckpt["losses"]), ckpt["train_seconds"]
        last_checkpoint, zero_shot = start, ckpt["zero_shot"]
        saved = ckpt["trainable"]
        own = dict(zip(names, params, strict=True))
        if set(saved) != set(own) or any(saved[n].shape != p.shape for n, p in own.items()):
            raise CheckpointError(
                f"checkpoint {ckpt_path} holds other adapter tensors than this model's; "
                "delete it to restart the run, or use another --output"
            )
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(saved[n])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"][rank])
        if main:
            log(f"resumed from {ckpt_path} at iteration {start}/{total}")
    del ckpt

    fixed_text = text_plan = None
    if not train_text:  # the text tower is frozen: its features are constants, encode them once
        model.eval()
        fixed_text = text_features(model, tokens, precision=precision)
    else:
        # Every step encodes the same prompts (this rank's shard): plan the buckets once,
        # rather than one host sync per step.
        # At the device's per-bucket cost (clip_lora.text.bucket_cost): on a GPU a bucket
        # costs a whole host-bound pass eager, and buys nothing measurable compiled.
        lo, hi = _shard_bounds(data.num_classes, rank, world)
        text_plan = plan_text(model, tokens[lo:hi], cost=bucket_cost(device))

    loader = torch.utils.data.DataLoader(
        ImageDataset(shots, train_transform(image_size, mean, std)),
        batch_sampler=_RankBatches(plan, start, total, rank, world),
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # keep the global RNG (dropout seeds) untouched
    )

    def loss_fn(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _loss_sum(
            model,
            images,
            labels,
            tokens=tokens if train_text else None,
            fixed_text=fixed_text,
            num_classes=data.num_classes,
            train_vision=train_vision,
            precision=precision,
            logit_scale=logit_scale,
            rank=rank,
            world=world,
            text_plan=text_plan,
        )

    def save_checkpoint(done: int) -> None:
        rng = [None] * world
        if world > 1:
            dist.all_gather_object(rng, _rng_state())
        else:
            rng[0] = _rng_state()
        if main:
            state = {
                "iteration": done,
                "recipe": cfg.recipe(),
                "trainable": {n: p.detach().cpu().clone() for n, p in zip(names, params, strict=True)},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng,
                "losses": losses,
                "zero_shot": zero_shot,
                "train_seconds": train_seconds + time.perf_counter() - t0,
            }
            tmp = f"{ckpt_path}.tmp{os.getpid()}"
            torch.save(state, tmp)
            os.replace(tmp, ckpt_path)

    # ---- divergence: checked on the host copies of the losses, never a sync per step
    watch = DivergenceWatch(SCALER_PATIENCE if scaler.is_enabled() else 0)
    pending: list[torch.Tensor] = []  # losses not yet copied to the host

    def diverged(at: int) -> DivergenceError:
        value = losses[at - 1] if 0 < at <= len(losses) else float("nan")
        kept = (
            f"the last finite checkpoint (iteration {last_checkpoint}) stays in {ckpt_path}"
            if last_checkpoint
            else "no checkpoint was written"
        )
        what = f"the loss is {value}" if not math.isfinite(value) else "the adapters hold non-finite values"
        msg = (
            f"training diverged at iteration {at}/{total}: {what} (lr {cfg.lr:g}, {precision}); "
            f"no adapter was written and {kept}. Try a lower --lr (e.g. {cfg.lr / 10:g}) or, on a GPU, "
            "--precision bf16; then rerun with --force or another --output"
        )
        log(msg)
        return DivergenceError(msg)

    def flush() -> None:
        """Copy the pending losses to the host (one sync) and check them."""
        if not pending:
            return
        first = len(losses) + 1
        losses.extend(torch.stack(pending).float().cpu().tolist())
        pending.clear()
        began = watch.update(losses[first - 1 :], first)
        if began is not None:
            raise diverged(began)

    def check_adapters(it: int) -> None:
        """Before anything is written: the adapters themselves are finite (one sync)."""
        if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise diverged(watch.start or it)

    # ---- loop
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    bar = None
    if main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True)
    t0 = time.perf_counter()
    seen = 0
    it = start
    cuda_graphs = cfg.compile and device.type == "cuda"
    if main and cfg.compile:
        compiled = ", ".join(compile_targets(model)) or "none (no open_clip tower: all eager)"
        log(f"torch.compile: {compiled}{' with CUDA graphs' if cuda_graphs else ''}; the first steps compile")
    towers = compiled_towers(model, device) if cfg.compile else contextlib.nullcontext()
    try:
        with towers:
            for images, labels in loader:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                global_batch = len(plan.batch(it))
                pending.append(
                    train_step(
                        loss_fn,
                        images,
                        labels,
                        global_batch=global_batch,
                        params=params,
                        optimizer=optimizer,
                        scheduler=scheduler,
                        scaler=scaler,
                        world=world,
                        cuda_graphs=cuda_graphs,
                    )
                )
                seen += global_batch
                it += 1
                if it % LOSS_CHECK_EVERY == 0 or it == total:
                    flush()
                    if bar is not None:
                        elapsed = time.perf_counter() - t0
                        bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{seen / max(elapsed, 1e-9):.1f}")
                        bar.update(it - bar.n)
                if (cfg.checkpoint_every and it % cfg.checkpoint_every == 0 and it < total) or it == stop_after:
                    flush()
                    check_adapters(it)
                    save_checkpoint(it)
                    last_checkpoint = it
                    if main:
                        log(f"iteration {it}/{total}: loss {losses[-1]:.4f}, lr {scheduler.get_last_lr()[0]:.3e}")
                if it == stop_after:
                    return {"interrupted": True, "iteration": it}
            flush()
            check_adapters(total)
    finally:
        if bar is not None:
            bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds += time.perf_counter() - t0
    peak, peak_kind = _peak_memory(device)

    # ---- finish: the adapter first, so that a failing final evaluation cannot lose it
    if main:
        save_adapter(model, os.path.join(cfg.output, ADAPTER_FILE))
    final = run_eval()
    metrics = {
        "dataset": data.name,
        "display_name": display_name(cfg.dataset),
        "shots": cfg.shots,
        "seed": cfg.seed,
        "model": cfg.model,
        "pretrained": cfg.pretrained,
        "activation": mlp_activation(model),
        "fused": cfg.fused,
        "compile": cfg.compile,
        "lora": cfg.lora.to_dict(),
        "iterations": total,
        "world_size": world,
        "device": device.type,
        "precision": precision,
        "logit_scale": logit_scale,
        "logit_scale_source": logit_scale_source,
        "zero_shot_accuracy": zero_shot["accuracy"] if zero_shot else None,
        "accuracy": final["accuracy"],
        "correct": final["correct"],
        "test_images": final["total"],
        "per_class_accuracy": final["per_class"],
        "zero_shot_per_class_accuracy": zero_shot["per_class"] if zero_shot else None,
        "classnames": data.classnames,
        "train_seconds": train_seconds,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "loss_curve": losses,
        "versions": _versions(),
    }
    if main:
        write_json(os.path.join(cfg.output, METRICS_FILE), metrics)
        zs = f"zero-shot {zero_shot['accuracy']:.2f}% -> " if zero_shot else ""
        log(
            f"done: {zs}test accuracy {final['accuracy']:.2f}% ({final['correct']}/{final['total']}), "
            f"{train_seconds:.1f}s training, peak memory {peak / 2**20:.0f} MiB ({peak_kind})"
        )
    return metrics


def _versions() -> dict[str, str]:
    import open_clip

    out = {"torch": torch.__version__, "open_clip": open_clip.__version__, "python": sys.version.split()[0]}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:  # CPU-only installs may lack triton
        pass
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out
