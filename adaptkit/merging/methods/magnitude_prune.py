"""``magnitude_prune``: keep the largest-magnitude entries of each delta, then add them up.

``dW = sum_i w_i trim(dW_i)`` with TIES' trim (the ``density`` fraction of entries of largest
magnitude): task arithmetic on sparsified task vectors, without sign election (PEFT's
``magnitude_prune``, done on the deltas rather than on A and B).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adaptkit.merging.methods.base import Delta, MergeMethod, dense, keep_largest


class MagnitudePrune(MergeMethod):
    """``sum_i w_i * trim_density(dW_i)``."""

    name = "magnitude_prune"
    parameters = ("density",)

    def combine(self, deltas: Sequence[Delta], weights: Sequence[float], key: str, indices: Sequence[int]) -> torch.Tensor:
        out = torch.zeros(deltas[0].shape, dtype=torch.float32)
        for delta, w in zip(deltas, weights):
            out += w * keep_largest(dense(delta), self.density)
        return out
