"""``linear``: task arithmetic, ``dW = sum_i w_i dW_i`` (Ilharco et al., 2023, "Editing Models with
Task Arithmetic"). Negative weights subtract a task (forgetting, negation).

As a LoRA this is exact: stacking the factors concatenates the ranks,
``sum_i w_i s_i B_i A_i = [w_1 s_1 B_1, ..., w_n s_n B_n] @ [A_1; ...; A_n]`` (rank ``sum_i r_i``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adaptkit.lowrank import LowRank
from adaptkit.merging.methods.base import Delta, MergeMethod, dense


class Linear(MergeMethod):
    """``sum_i w_i dW_i``; exact as an adapter of rank ``sum_i r_i``."""

    name = "linear"
    is_linear = True

    def combine(self, deltas: Sequence[Delta], weights: Sequence[float], key: str, indices: Sequence[int]) -> torch.Tensor:
        out = torch.zeros(deltas[0].shape, dtype=torch.float32)
        for delta, w in zip(deltas, weights):
            out += w * dense(delta)
        return out

    def factor(
        self, deltas: Sequence[Delta], weights: Sequence[float], key: str, indices: Sequence[int], rank: int | None = None
    ) -> LowRank:
        """The exact rank-concatenated factors (``rank`` is not used: nothing is truncated)."""
        if not all(isinstance(d, LowRank) for d in deltas):
            return super().factor(deltas, weights, key, indices, min(deltas[0].shape))
        B = torch.cat([w * d.B.float() for d, w in zip(deltas, weights)], dim=1)
        A = torch.cat([d.A.float() for d in deltas], dim=0)
        self.energy[key] = 1.0
        return LowRank(B=B, A=A)
