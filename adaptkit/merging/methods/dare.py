"""``dare_linear`` and ``dare_ties``: DARE (Yu et al., 2024, "Language Models are Super Mario").

Drop And REscale: each entry of each delta is kept with probability ``density`` (``p = 1 - density``
is the paper's drop rate) and the kept entries are divided by ``density``, so the expected delta is
unchanged: ``dare(dW) = m * dW / density``, ``m ~ Bernoulli(density)``.

- ``dare_linear``: ``sum_i w_i dare(dW_i)``;
- ``dare_ties``: TIES' sign election and weighted disjoint mean over ``w_i dare(dW_i)``
  (``normalize=False``: the weighted sum of the agreeing entries, mergekit's default for dare_ties).

The masks are drawn from ``torch.Generator`` seeded by :func:`~adaptkit.merging.methods.base.seed_for`
(``seed``, tensor key, adapter index): the same seed gives the same merge, whatever the shard order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adaptkit.merging.methods.base import Delta, MergeMethod, dense, disjoint_mean, seed_for


def dare(delta: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """``m * delta / density`` with ``m ~ Bernoulli(density)`` drawn by a generator seeded with ``seed``."""
    if density >= 1.0:
        return delta
    generator = torch.Generator().manual_seed(seed)
    keep = torch.bernoulli(torch.full(delta.shape, density, dtype=torch.float32), generator=generator)
    return delta * keep.to(delta.device) / density


class _Dare(MergeMethod):
    parameters = ("density", "seed")

    def _dropped(self, deltas: Sequence[Delta], weights: Sequence[float], key: str, indices: Sequence[int]):
        return torch.stack([
            w * dare(dense(d), self.density, seed_for(self.seed, key, i)) for d, w, i in zip(deltas, weights, indices)
        ])


class DareLinear(_Dare):
    """``sum_i w_i * m_i * dW_i / density``."""

    name = "dare_linear"

    def combine(self, deltas: Sequence[Delta], weights: Sequence[float], key: str, indices: Sequence[int]) -> torch.Tensor:
        return self._dropped(deltas, weights, key, indices).sum(dim=0)


class DareTies(_Dare):
    """DARE on each delta, then TIES' sign election and weighted disjoint mean."""

    name = "dare_ties"
    parameters = ("density", "seed", "normalize")
    signs_elected = True

    def combine(self, deltas: Sequence[Delta], weights: Sequence[float], key: str, indices: Sequence[int]) -> torch.Tensor:
        return disjoint_mean(self._dropped(deltas, weights, key, indices), weights, self.normalize)
