"""A small generated dataset in the CoOp layout, for tests and the CPU demo.

Each class is a coloured shape ("red circle", "blue triangle" ...) of random size and
position on a noisy grey background.  Colour alone identifies the class, so even a
randomly initialised CLIP can learn it through LoRA in a few dozen steps; the shape is
a second, harder cue for a pretrained one.
"""

from __future__ import annotations

import json
import os
import random

from PIL import Image, ImageDraw

# (name, RGB): distinct hues, far apart so that random crops keep them separable.
COLOURS = (
    ("red", (220, 30, 30)),
    ("green", (30, 190, 40)),
    ("blue", (30, 60, 230)),
    ("yellow", (235, 220, 30)),
    ("magenta", (210, 40, 210)),
    ("cyan", (40, 210, 220)),
    ("orange", (245, 140, 20)),
    ("black", (15, 15, 15)),
    ("white", (245, 245, 245)),
    ("purple", (110, 40, 160)),
)
SHAPES = ("circle", "square", "triangle", "cross", "ring")
MAX_CLASSES = len(COLOURS)


def synthetic_classnames(num_classes: int) -> list[str]:
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 2..{MAX_CLASSES}, got {num_classes}")
    return [f"{COLOURS[i][0]}_{SHAPES[i % len(SHAPES)]}" for i in range(num_classes)]


def _draw(rng: random.Random, colour: tuple[int, int, int], shape: str, size: int) -> Image.Image:
    grey = rng.randint(90, 160)
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    px = img.load()
    for _ in range(size * size // 8):  # sparse noise so the background is not a constant
        x, y = rng.randrange(size), rng.randrange(size)
        v = max(0, min(255, grey + rng.randint(-40, 40)))
        px[x, y] = (v, v, v)
    jitter = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in colour)
    side = int(size * rng.uniform(0.5, 0.8))
    x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
    box = (x0, y0, x0 + side, y0 + side)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse(box, fill=jitter)
    elif shape == "square":
        draw.rectangle(box, fill=jitter)
    elif shape == "triangle":
        draw.polygon([(x0 + side // 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=jitter)
    elif shape == "cross":
        t = side // 3
        draw.rectangle((x0 + t, y0, x0 + 2 * t, y0 + side), fill=jitter)
        draw.rectangle((x0, y0 + t, x0 + side, y0 + 2 * t), fill=jitter)
    else:  # ring
        draw.ellipse(box, outline=jitter, width=max(2, side // 5))
    return img


def make_synthetic(
    root: str,
    *,
    num_classes: int = 6,
    train_per_class: int = 16,
    val_per_class: int = 4,
    test_per_class: int = 10,
    image_size: int = 64,
    seed: int = 0,
) -> str:
    """Write ``<root>/synthetic/images/<class>/*.png`` and ``split_zhou_Synthetic.json``.

    Returns the dataset folder.  Load it with ``load_dataset("synthetic", root)``.
    Deterministic in ``seed``.
    """
    names = synthetic_classnames(num_classes)
    if min(train_per_class, test_per_class) < 1 or val_per_class < 0:
        raise ValueError("train_per_class and test_per_class must be >= 1, val_per_class >= 0")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    folder = os.path.join(root, "synthetic")
    rng = random.Random(seed)
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    for label, name in enumerate(names):
        os.makedirs(os.path.join(folder, "images", name), exist_ok=True)
        colour = COLOURS[label][1]
        shape = SHAPES[label % len(SHAPES)]
        for part, n in counts.items():
            for j in range(n):
                rel = f"{name}/{part}_{j:04d}.png"
                _draw(rng, colour, shape, image_size).save(os.path.join(folder, "images", rel))
                split[part].append([rel, label, name])
    tmp = os.path.join(folder, f".split.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(split, f, indent=1)
    os.replace(tmp, os.path.join(folder, "split_zhou_Synthetic.json"))
    return folder
