"""``ties``: TIES-Merging (Yadav et al., 2023, "Resolving Interference When Merging Models").

Per tensor, on the deltas ``dW_i``:

1. trim: keep the ``density`` fraction of entries of largest magnitude in each ``dW_i``;
2. elect: ``gamma = sign(sum_i w_i trim(dW_i))`` per entry;
3. disjoint mean: average, with weights ``w_i``, only the entries whose sign agrees with ``gamma``
   (``normalize=False``: their weighted sum, as mergekit's ``normalize: false``).

With all weights 1 this is the paper's Algorithm 1 (``lambda = 1``); weights act as relative
importances (the weighted mean of mergekit's ``ties``), so they must be positive.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adaptkit.merging.methods.base import Delta, MergeMethod, dense, disjoint_mean, keep_largest


class Ties(MergeMethod):
    """Trim to ``density``, elect a sign per entry, weighted mean of the agreeing entries."""

    name = "ties"
    parameters = ("density", "normalize")
    signs_elected = True

    def combine(self, deltas: Sequence[Delta], weights: Sequence[float], key: str, indices: Sequence[int]) -> torch.Tensor:
        weighted = torch.stack([w * keep_largest(dense(d), self.density) for d, w in zip(deltas, weights)])
        return disjoint_mean(weighted, weights, self.normalize)
