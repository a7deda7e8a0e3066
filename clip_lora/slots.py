"""``SlotAdapters``: the A (or B) matrices of one projection's slots, packed or one per slot.

A patched projection has S output slots (q, k, v of a packed ``in_proj_weight``; one slot
for an output projection) and an adapter on some of them.  The fused kernel reads the
adapters packed: ``A_cat [S·r, K]`` (slot s in rows ``s·r … s·r+r``) and ``B_cat [N, r]``
(slot s in its output rows).  Packing them on every call (``torch.cat``) costs host
time and, worse, gives autograd 2·S adapter leaves instead of two: with the kernels
stubbed out, a q/k/v projection's forward+backward takes 167 µs of host time with
per-slot Parameters and 93 µs with A and B each one Parameter (``python -m
bench.host_path``, bench/NOTES.md section 7).

So with ``packed=True`` (the fused provider) each projection whose slots are all adapted
is ONE Parameter (named after its slots, ``q_k_v``) and ``self[name]`` is a view of that
slot's rows.  With
``packed=False`` (the plain baselines, which are meant to look like PEFT, or a
projection with an unadapted slot) it holds one Parameter per adapted slot.  Either
way the state-dict keys are ``<prefix><name>`` (``…lora_A.q``), so saved adapters,
checkpoints of merged weights and the official-format import do not depend on the
layout; state-dict values are copies, never views of the packed tensor (safetensors
refuses tensors that share memory).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn


def _fp32_zeros(rows: int, cols: int, device) -> nn.Parameter:
    # fp32 master adapters whatever the frozen dtype (DESIGN §3 precision).
    return nn.Parameter(torch.zeros(rows, cols, device=device, dtype=torch.float32))


class SlotAdapters(nn.Module):
    """Per-slot adapter matrices of a module's projections, by slot name.

    Args:
        groups: the slots of each projection, in output order (``[("q", "k", "v"),
            ("o",)]`` for an attention; one group for a Linear).
        params: the adapted slots.
        rows: per slot, its matrix's row count (r for A; the slot's width for B).
        cols: the column count (K for A; r for B).
        packed: store each projection whose slots are all adapted as one Parameter,
            named after its slots (``q_k_v``); otherwise one Parameter per slot.
        init: "kaiming" (A: PyTorch's Linear init, per slot) or "zeros" (B).
    """

    def __init__(
        self,
        groups: Sequence[Sequence[str]],
        params: Sequence[str],
        rows: dict[str, int],
        cols: int,
        *,
        packed: bool,
        init: str,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if init not in ("kaiming", "zeros"):
            raise ValueError(f"init must be 'kaiming' or 'zeros', got {init!r}")
        self.names = tuple(s for g in groups for s in g if s in params)
        self._where: dict[str, tuple[str, slice | None]] = {}  # slot -> (Parameter name, rows or None)
        self._packed: dict[tuple[str, ...], str] = {}  # group -> its packed Parameter's name
        for group in map(tuple, groups):
            adapted = [s for s in group if s in params]
            if packed and len(group) > 1 and len(adapted) == len(group):
                name = "_".join(group)
                starts = [0, *itertools.accumulate(rows[s] for s in group)]
                self.register_parameter(name, _fp32_zeros(starts[-1], cols, device))
                self._packed[group] = name
                for i, s in enumerate(group):
                    self._where[s] = (name, slice(starts[i], starts[i + 1]))
            else:
                for s in adapted:
                    self.register_parameter(s, _fp32_zeros(rows[s], cols, device))
                    self._where[s] = (s, None)
        if init == "kaiming":
            with torch.no_grad():
                for s in self.names:  # slot order: a seed gives the same values in both layouts
                    nn.init.kaiming_uniform_(self[s], a=math.sqrt(5))  # B = 0: a fresh adapter changes nothing

    def packed(self, group: tuple[str, ...]) -> nn.Parameter | None:
        """The one Parameter holding every slot of ``group`` in order (a one-slot group's
        own Parameter), or None when the group's slots are stored apart or not all adapted."""
        name = self._packed.get(group)
        if name is None and len(group) == 1 and group[0] in self._where:
            pname, rows = self._where[group[0]]
            name = pname if rows is None else None
        # The module's own dict: nn.Module.__getattr__ costs ~0.6 µs a lookup, and a
        # patched projection asks for its packed adapters on every call.
        return None if name is None else self._parameters[name]

    # -- the mapping API (what ParameterDict offered) -------------------------

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"no adapter for slot {name!r}; adapted slots: {', '.join(self.names)}")
        pname, rows = self._where[name]
        param = getattr(self, pname)
        return param if rows is None else param[rows]

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def keys(self) -> tuple[str, ...]:
        return self.names

    def values(self) -> list[torch.Tensor]:
        return [self[s] for s in self.names]

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return [(s, self[s]) for s in self.names]

    def grad(self, name: str) -> torch.Tensor | None:
        """The gradient of slot ``name`` (a view into a packed gradient), or None."""
        pname, rows = self._where[name]
        g = getattr(self, pname).grad
        return g if g is None or rows is None else g[rows]

    # -- state dict: per-slot keys whatever the layout ------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for s in self.names:
            value = self[s]
            if not keep_vars:
                # A view of a packed Parameter is copied: safetensors refuses tensors
                # that share memory, and a state dict should not depend on the layout.
                value = value.detach() if self._where[s][1] is None else value.detach().clone()
            destination[prefix + s] = value

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Values are copied into place (also under load_state_dict(assign=True)): a
        # packed Parameter cannot be replaced slot by slot.  Every entry is checked
        # before any is copied, so a bad entry leaves this module's adapters unchanged.
        copies, bad = [], False
        for s in self.names:
            key = prefix + s
            if key not in state_dict:
                missing_keys.append(key)
                bad = bad or strict
                continue
            value, target = state_dict[key], self[s]
            if not isinstance(value, torch.Tensor) or value.shape != target.shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {shape} from checkpoint, "
                    f"the shape in current model is {tuple(target.shape)}."
                )
                bad = True
                continue
            copies.append((target, value))
        if not bad:
            with torch.no_grad():
                for target, value in copies:
                    target.copy_(value)
        if strict:
            for key in state_dict:
                rest = key[len(prefix) :] if key.startswith(prefix) else None
                if rest is not None and "." not in rest and rest not in self._where:
                    unexpected_keys.append(key)

    def extra_repr(self) -> str:
        packed = [",".join(g) for g in self._packed]
        return f"slots={','.join(self.names)}" + (f", packed: {' '.join(packed)}" if packed else "")
