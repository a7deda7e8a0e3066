"""The CoOp few-shot protocol: k images per class, drawn by seed, saved next to the results."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence

from .datasets import DatasetError, Sample


def check_shots(shots: int) -> int:
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be a positive integer (images per class), got {shots!r}")
    return shots


def _draw(samples: Sequence[Sample], shots: int, rng: random.Random) -> list[Sample]:
    """CoOp's ``generate_fewshot_dataset(repeat=True)`` with the stream ``rng``.

    Classes are visited in order of first appearance in ``samples`` (the official code's
    ``defaultdict`` insertion order), each keeping its file order; ``shots`` are drawn
    without replacement, or with replacement when the class has fewer images.
    """
    by_label: dict[int, list[Sample]] = {}
    for s in samples:
        by_label.setdefault(s.label, []).append(s)
    chosen: list[Sample] = []
    for items in by_label.values():
        chosen += rng.sample(items, shots) if len(items) >= shots else rng.choices(items, k=shots)
    return chosen


def sample_few_shot(samples: Sequence[Sample], shots: int, seed: int) -> list[Sample]:
    """Draw ``shots`` samples per class with ``random.Random(seed)``.

    Without replacement, except for a class that has fewer than ``shots`` images, which
    is drawn with replacement (CoOp's ``generate_fewshot_dataset(repeat=True)``).  Classes
    are visited in order of first appearance and each keeps its file order, so the result
    depends only on the list and the seed.  Classes absent from ``samples`` get no shots.
    (:func:`official_few_shot` draws exactly the images the official code draws.)
    """
    check_shots(shots)
    return _draw(samples, shots, random.Random(seed))


def official_few_shot(train: Sequence[Sample], val: Sequence[Sample], shots: int, seed: int, *, imagenet: bool = False):
    """The training images the official CLIP-LoRA code draws for ``seed``.

    Its ``main.py`` calls ``random.seed(seed)`` and then builds the dataset, which draws
    from Python's global stream: first ``min(shots, 4)`` validation images per class,
    then ``shots`` training images per class (``datasets/<name>.py``,
    ``generate_fewshot_dataset``).  ImageNet instead draws ``shots + min(shots, 4)``
    images per class from the training folder in one ``random.sample`` and keeps the
    first ``shots`` for training (``datasets/imagenet.py``).  Replaying that stream with
    ``random.Random(seed)`` selects the same images (same split file / folders, same
    order), so "seed 1" here is the official seed 1.
    """
    check_shots(shots)
    rng = random.Random(seed)
    n_val = min(shots, 4)
    if imagenet:
        by_label: dict[int, list[Sample]] = {}
        for s in train:
            by_label.setdefault(s.label, []).append(s)
        chosen: list[Sample] = []
        for items in by_label.values():
            if len(items) >= shots + n_val:
                chosen += rng.sample(items, shots + n_val)[:shots]
            else:  # the official code would fail here (a partial ImageNet); fall back to CoOp's rule
                chosen += rng.sample(items, shots) if len(items) >= shots else rng.choices(items, k=shots)
        return chosen
    if val:
        _draw(val, n_val, rng)  # consumed, as the official code does, before the training draw
    return _draw(train, shots, rng)


def save_few_shot(
    path: str, samples: Sequence[Sample], *, image_root: str, dataset: str, shots: int, seed: int
) -> None:
    """Write the drawn list as JSON (paths relative to ``image_root``, like a split file); atomic."""
    header = {"dataset": dataset, "shots": shots, "seed": seed, "image_root": image_root}
    rows = [json.dumps([os.path.relpath(s.path, image_root), s.label, s.classname]) for s in samples]
    # One image per line: the list stays readable and diffable between seeds.
    text = json.dumps(header, indent=1)[:-2] + ',\n "train": [\n  ' + ",\n  ".join(rows) + "\n ]\n}\n"
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def load_few_shot(path: str, image_root: str | None = None) -> list[Sample]:
    """Read a list written by :func:`save_few_shot` (optionally relocated to another ``image_root``)."""
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
        root = image_root or payload["image_root"]
        return [Sample(os.path.join(root, rel), int(label), cname) for rel, label, cname in payload["train"]]
    except FileNotFoundError:
        raise DatasetError(f"few-shot list not found: {path}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"malformed few-shot list {path}: {e}; expected the JSON written by training") from None
