"""What a merge method is: a rule that combines the *delta weights* of one tensor.

A method receives, for one tensor, the deltas ``dW_i`` of the adapters that change it (for a LoRA
layer ``s_i B_i A_i`` [out, in], kept factored as :class:`~adaptkit.lowrank.LowRank`; for a
``lora_bias`` the bias delta [out]) and one weight ``w_i`` per delta, and returns the combined
delta. The caller adds it to the base weight or factors it back into a LoRA.

Methods never see A and B separately: combining factors (as PEFT's ``add_weighted_adapter`` does
for linear/ties/dare) adds the cross terms ``B_i A_j`` and mis-scales adapters of different
``alpha/r``. Deltas already include each adapter's scale, so rsLoRA, ``rank_pattern`` and
``alpha_pattern`` are accounted for before a method runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import ClassVar

import torch

from adaptkit.errors import InvalidArgumentError
from adaptkit.lowrank import LowRank, truncated_svd

Delta = torch.Tensor | LowRank


def dense(delta: Delta) -> torch.Tensor:
    """A delta as a float32 tensor."""
    return delta.dense() if isinstance(delta, LowRank) else delta.float()


def seed_for(seed: int, key: str, index: int) -> int:
    """The generator seed of adapter ``index`` on tensor ``key``.

    Derived from the names, not from a running stream, so the draws do not depend on the order in
    which tensors are visited: a streaming merge and an adapter combination draw the same masks.
    """
    digest = hashlib.sha256(f"{seed}/{key}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def check_density(density, method: str) -> float:
    """``density`` as a float in (0, 1], or a clear error."""
    if density is None:
        raise InvalidArgumentError(
            f"method {method!r} needs density: the fraction of each delta's entries kept, in (0, 1] (e.g. density=0.5)"
        )
    try:
        value = float(density)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"density must be a number in (0, 1], got {density!r}") from None
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise InvalidArgumentError(f"density must be in (0, 1], got {density!r}; e.g. density=0.5 keeps half")
    return value


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class MergeMethod:
    """Base class: combine the deltas of one tensor into one delta.

    Subclasses set ``name``, the ``parameters`` they take, and implement :meth:`combine`.
    Parameters a method does not take are rejected by name, so a typo never passes silently.
    """

    name: ClassVar[str] = ""
    parameters: ClassVar[tuple[str, ...]] = ()  # of "density", "seed", "rank", "normalize"
    is_linear: ClassVar[bool] = False  # result == sum_i w_i dW_i (exact as a rank-concatenated LoRA)
    signs_elected: ClassVar[bool] = False  # elects a sign across adapters: weights must be positive

    def __init__(self, density: float | None = None, seed: int | None = None, rank: int | None = None,
                 normalize: bool | None = None):
        given = {"density": density, "seed": seed, "rank": rank, "normalize": normalize}
        extra = sorted(k for k, v in given.items() if v is not None and k not in self.parameters)
        if extra:
            takes = ", ".join(self.parameters) or "no parameters"
            raise InvalidArgumentError(f"merge method {self.name!r} does not take {', '.join(extra)} (it takes {takes})")
        self.density = check_density(density, self.name) if "density" in self.parameters else None
        self.seed = _check_int("seed", 0 if seed is None else seed, 0) if "seed" in self.parameters else None
        self.rank = None if rank is None else _check_int("rank", rank, 1)
        if normalize is not None and not isinstance(normalize, bool):
            raise InvalidArgumentError(f"normalize must be true or false, got {normalize!r}")
        self.normalize = (True if normalize is None else normalize) if "normalize" in self.parameters else None
        self.energy: dict[str, float] = {}  # tensor key -> share of ||delta||_F^2 kept (methods that truncate)

    def params(self) -> dict:
        """The parameters in effect, for records and messages."""
        return {k: getattr(self, k) for k in self.parameters if getattr(self, k) is not None}

    def check_weights(self, weights: Sequence[float]) -> None:
        if self.signs_elected and any(w <= 0 for w in weights):
            raise InvalidArgumentError(
                f"method {self.name!r} elects a sign across adapters, so weights must be positive (got {list(weights)}); "
                "to subtract an adapter use method 'linear' (task arithmetic) with a negative weight"
            )

    def combine(self, deltas: Sequence[Delta], weights: Sequence[float], key: str, indices: Sequence[int]) -> torch.Tensor:
        """The combined delta (float32, the shape of each delta).

        ``key`` names the tensor and ``indices`` the position of each delta's adapter in the merge
        (both only seed random methods).
        """
        raise NotImplementedError

    def factor(
        self, deltas: Sequence[Delta], weights: Sequence[float], key: str, indices: Sequence[int], rank: int
    ) -> LowRank:
        """The combined delta of a 2-D tensor as rank-``rank`` LoRA factors (truncated SVD, energy recorded)."""
        low_rank = truncated_svd(self.combine(deltas, weights, key, indices), rank)
        self.energy[key] = low_rank.energy
        return low_rank

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the ``k = max(1, int(density * n))`` entries of largest magnitude, zero the rest."""
    if density >= 1.0:
        return delta
    flat = delta.reshape(-1)
    k = max(1, int(density * flat.numel()))
    mask = torch.zeros_like(flat)
    mask[flat.abs().topk(k).indices] = 1.0
    return (flat * mask).view_as(delta)


def disjoint_mean(weighted: torch.Tensor, weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """TIES' elect + disjoint merge over stacked weighted deltas ``v_i = w_i * dW_i`` [n, ...].

    Elect ``gamma = sign(sum_i v_i)`` (0 counts as +), keep the ``v_i`` whose sign agrees and
    average them with their weights: ``sum_i m_i v_i / sum_i m_i w_i`` (an entry nobody keeps is 0);
    ``normalize=False`` keeps the sum ``sum_i m_i v_i`` (mergekit's ``normalize: false``).
    With all weights 1 this is Yadav et al. (2023), Algorithm 1, steps 2-3.
    """
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
    agrees = (weighted.sign() == elected).float()
    kept = (weighted * agrees).sum(dim=0)
    if not normalize:
        return kept
    w = torch.tensor(list(weights), dtype=weighted.dtype).view(-1, *([1] * (weighted.ndim - 1)))
    divisor = (agrees * w).sum(dim=0)
    return kept / torch.where(divisor == 0, 1.0, divisor)


class Scaled(MergeMethod):
    """Another method's combined delta times ``factor`` (mergekit's ``lambda``)."""

    def __init__(self, inner: MergeMethod, factor: float):
        super().__init__()
        self.inner, self.factor = inner, float(factor)
        self.name, self.parameters = inner.name, inner.parameters
        self.is_linear, self.signs_elected = inner.is_linear, inner.signs_elected
        self.energy = inner.energy

    def params(self) -> dict:
        return {**self.inner.params(), "lambda": self.factor}

    def check_weights(self, weights: Sequence[float]) -> None:
        self.inner.check_weights(weights)

    def combine(self, deltas: Sequence[Delta], weights: Sequence[float], key: str, indices: Sequence[int]) -> torch.Tensor:
        return self.factor * self.inner.combine(deltas, weights, key, indices)
