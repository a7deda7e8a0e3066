"""Where LoRA goes in a CLIP model and how it is scaled: the paper's recipe as a dataclass."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

ENCODERS = ("both", "vision", "text")
PARAMS = ("q", "k", "v", "o")
SCALINGS = ("alpha/sqrt(r)", "alpha/r")
POSITIONS = ("all", "bottom", "mid", "up", "half-up", "half-bottom", "top1", "top2", "top3")
MAX_RANK = 64  # lora_kernels.MAX_RANK; repeated so that importing the config stays free of triton


def position_blocks(position: str | Sequence[int], depth: int) -> list[int]:
    """Block indices that ``position`` selects in a tower of ``depth`` blocks.

    The named positions are fractions of the tower, which reproduces the paper's table
    for 12 blocks (bottom 0-3, mid 4-7, up 8-11, half-up 6-11, half-bottom 0-5) and the
    24-block towers of ViT-L/14 (all 0-23, half-up 12-23, half-bottom 0-11; thirds of 8
    blocks for bottom/mid/up).  ``topN`` is always the last N blocks.  A depth that does
    not divide evenly raises rather than guessing where a boundary falls.
    """
    if depth < 1:
        raise ValueError(f"a tower needs at least one block, got depth {depth}")
    if not isinstance(position, str):
        indices = sorted(set(position))
        bad = [i for i in indices if not 0 <= i < depth]
        if bad:
            raise ValueError(f"position: block indices {bad} do not exist in a {depth}-block tower (0..{depth - 1})")
        return indices
    half, third = depth // 2, depth // 3
    table: dict[str, list[int]] = {"all": list(range(depth))}
    if depth % 2 == 0:
        table["half-bottom"] = list(range(half))
        table["half-up"] = list(range(half, depth))
    if depth % 3 == 0:
        table["bottom"] = list(range(third))
        table["mid"] = list(range(third, 2 * third))
        table["up"] = list(range(2 * third, depth))
    for n in (1, 2, 3):
        if depth >= n:
            table[f"top{n}"] = list(range(depth - n, depth))
    if position not in table:
        allowed = ", ".join(p for p in POSITIONS if p in table)
        raise ValueError(
            f"position {position!r} is not defined for a {depth}-block tower; allowed there: {allowed}, "
            "or an explicit list of block indices"
        )
    return table[position]


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA settings of CLIP-LoRA (defaults: the paper's fixed recipe).

    Attributes:
        r: adapter rank, 1..64.
        alpha: LoRA alpha; the scale is ``alpha / sqrt(r)`` or ``alpha / r`` (``scaling``).
        dropout: LoRA dropout on the adapter input, in [0, 1); each adapted projection
            draws its own mask.
        scaling: "alpha/sqrt(r)" (the official code) or "alpha/r" (the LoRA paper).
        encoder: which towers get adapters: "both", "vision" or "text".
        params: attention projections to adapt, any of "q", "k", "v", "o".
        position: which blocks of each tower: one of ``POSITIONS`` or an explicit list of
            block indices (see :func:`position_blocks`).  The blocks are a tower's
            attention layers in depth order, whatever its family (a ResNet CLIP's vision
            tower is its one attention pool; see :mod:`clip_lora.families`).
        pooling_head: also adapt the attention-pooling head that follows some vision
            towers (SigLIP's and PE-Core's ``AttentionPoolLatent``), whatever
            ``position`` says.  Off by default: the paper adapts the towers' blocks only.
    """

    r: int = 2
    alpha: float = 1.0
    dropout: float = 0.25
    scaling: str = "alpha/sqrt(r)"
    encoder: str = "both"
    params: tuple[str, ...] = ("q", "k", "v")
    position: str | tuple[int, ...] = "all"
    pooling_head: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or not 1 <= self.r <= MAX_RANK:
            raise ValueError(f"r must be an integer in 1..{MAX_RANK}, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a finite number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}; got {self.scaling!r}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}; got {self.encoder!r}")
        params = (self.params,) if isinstance(self.params, str) else tuple(self.params)
        bad = [p for p in params if p not in PARAMS]
        if bad or not params:
            raise ValueError(f"params must be a non-empty subset of {', '.join(PARAMS)}; got {self.params!r}")
        # Canonical order, no repeats: ("v", "q") and ("q", "v") are the same adapter.
        object.__setattr__(self, "params", tuple(p for p in PARAMS if p in params))
        if isinstance(self.position, str):
            if self.position not in POSITIONS:
                raise ValueError(
                    f"position must be one of {', '.join(POSITIONS)} or a list of block indices; got {self.position!r}"
                )
        else:
            indices = tuple(self.position)
            if not indices or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
                raise ValueError(
                    f"position as a list must hold non-negative block indices, got {self.position!r}; "
                    f"or use one of {', '.join(POSITIONS)}"
                )
            object.__setattr__(self, "position", tuple(sorted(set(indices))))
        if not isinstance(self.pooling_head, bool):
            raise ValueError(f"pooling_head must be True or False, got {self.pooling_head!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def scale(self) -> float:
        """The factor on the adapter output ``B A x``."""
        if self.scaling == "alpha/r":
            return self.alpha / self.r
        return self.alpha / math.sqrt(self.r)

    @property
    def towers(self) -> tuple[str, ...]:
        """The adapted towers, text first (the official code's layer order)."""
        return ("text", "vision") if self.encoder == "both" else (self.encoder,)

    def blocks(self, depth: int) -> list[int]:
        """Indices of the adapted blocks in a tower of ``depth`` blocks."""
        return position_blocks(self.position, depth)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["params"] = list(self.params)
        if not isinstance(self.position, str):
            d["position"] = list(self.position)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoRAConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, not silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LoRAConfig fields {unknown}; known fields: {sorted(known)}")
        d = dict(d)
        if "params" in d and not isinstance(d["params"], str):
            d["params"] = tuple(d["params"])
        if "position" in d and not isinstance(d["position"], str):
            d["position"] = tuple(d["position"])
        return cls(**d)
