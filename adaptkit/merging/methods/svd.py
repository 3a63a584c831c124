"""``svd``: the linear combination truncated to a target rank by SVD (Eckart-Young).

``dW = truncate_k(sum_i w_i dW_i)``: the best rank-k approximation in the Frobenius norm; the
share of ``||sum_i w_i dW_i||_F^2`` kept is recorded per tensor in ``energy``. Without a ``rank``
the largest input rank of the tensor is used. The SVD runs on the stacked factors (QR, then an
SVD of an ``R x R`` core, ``R = sum_i r_i``), never on an ``out x in`` matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adaptkit.lowrank import LowRank, truncated_svd, truncated_svd_of_product
from adaptkit.merging.methods.base import Delta, MergeMethod, dense


class SvdTruncate(MergeMethod):
    """``truncate_k(sum_i w_i dW_i)`` with ``k = rank`` (default: the largest input rank)."""

    name = "svd"
    parameters = ("rank",)

    def _target_rank(self, deltas: Sequence[Delta], rank: int | None = None) -> int:
        if self.rank is not None:
            return self.rank
        if rank is not None:
            return rank
        ranks = [d.rank for d in deltas if isinstance(d, LowRank)]
        return max(ranks) if ranks else min(deltas[0].shape)

    def factor(
        self, deltas: Sequence[Delta], weights: Sequence[float], key: str, indices: Sequence[int], rank: int | None = None
    ) -> LowRank:
        k = self._target_rank(deltas, rank)
        if all(isinstance(d, LowRank) for d in deltas):
            B = torch.cat([w * d.B.float() for d, w in zip(deltas, weights)], dim=1)
            A = torch.cat([d.A.float() for d in deltas], dim=0)
            low_rank = truncated_svd_of_product(B, A, k)
        else:
            low_rank = truncated_svd(sum(w * dense(d) for d, w in zip(deltas, weights)), k)
        self.energy[key] = low_rank.energy
        return low_rank

    def combine(self, deltas: Sequence[Delta], weights: Sequence[float], key: str, indices: Sequence[int]) -> torch.Tensor:
        if isinstance(deltas[0], torch.Tensor) and deltas[0].ndim != 2:  # a bias: nothing to truncate
            return sum(w * dense(d) for d, w in zip(deltas, weights))
        return self.factor(deltas, weights, key, indices).dense()
