"""Merge methods: one file each, a static registry, one base class (mergekit's layout).

All methods combine *delta weights* per tensor (see :mod:`adaptkit.merging.methods.base`)::

    linear / task_arithmetic   sum_i w_i dW_i                       (negative weights subtract)
    svd                        truncate_k(sum_i w_i dW_i)           rank
    ties                       trim, elect sign, disjoint mean      density, normalize
    dare_linear                sum_i w_i dare(dW_i)                 density, seed
    dare_ties                  dare, elect sign, disjoint mean      density, seed, normalize
    magnitude_prune            sum_i w_i trim(dW_i)                 density
"""

from __future__ import annotations

from adaptkit.errors import InvalidArgumentError
from adaptkit.merging.methods.base import Delta, MergeMethod, Scaled, dense, seed_for
from adaptkit.merging.methods.dare import DareLinear, DareTies
from adaptkit.merging.methods.linear import Linear
from adaptkit.merging.methods.magnitude_prune import MagnitudePrune
from adaptkit.merging.methods.svd import SvdTruncate
from adaptkit.merging.methods.ties import Ties

MERGE_METHODS: dict[str, type[MergeMethod]] = {
    "linear": Linear,
    "task_arithmetic": Linear,  # mergekit's name for the same sum of deltas
    "svd": SvdTruncate,
    "ties": Ties,
    "dare_linear": DareLinear,
    "dare_ties": DareTies,
    "magnitude_prune": MagnitudePrune,
}


def check_method(method: str) -> type[MergeMethod]:
    """The class of a method name; unknown names raise with the sorted list of known ones."""
    if method not in MERGE_METHODS:
        raise InvalidArgumentError(f"unknown merge method {method!r}; known methods: {', '.join(sorted(MERGE_METHODS))}")
    return MERGE_METHODS[method]


def make_method(
    method: str | MergeMethod, density: float | None = None, seed: int | None = None, rank: int | None = None,
    normalize: bool | None = None,
) -> MergeMethod:
    """A method object from a name and its parameters (or the object itself, when no parameter is given).

    Example:
        >>> make_method("ties", density=0.5)
        Ties(density=0.5)
    """
    if isinstance(method, MergeMethod):
        if any(v is not None for v in (density, seed, rank, normalize)):
            raise InvalidArgumentError(f"give parameters to the method object ({method!r}), not beside it")
        return method
    if not isinstance(method, str):
        raise InvalidArgumentError(f"method must be a name or a MergeMethod, got {method!r}")
    return check_method(method)(density=density, seed=seed, rank=rank, normalize=normalize)


__all__ = [
    "MERGE_METHODS", "DareLinear", "DareTies", "Delta", "Linear", "MagnitudePrune", "MergeMethod", "Scaled", "SvdTruncate",
    "Ties", "check_method", "dense", "make_method", "seed_for",
]
