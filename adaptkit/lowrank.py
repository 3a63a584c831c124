"""Low-rank matrices ``B @ A`` and their best rank-k approximation (truncated SVD).

Eckart-Young: for ``D = U diag(S) V^T`` the closest rank-k matrix in the Frobenius norm keeps the
k largest singular values, and the share of ``||D||_F^2`` it keeps (the *energy*) is::

    energy_k = sum_{j<k} S_j^2 / sum_j S_j^2

The rank-k factors are split evenly, ``B = U_k sqrt(S_k)`` [out, k], ``A = sqrt(S_k) V_k^T`` [k, in],
so neither factor carries all the scale (what a LoRA trained further would start from).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRank:
    """``B @ A`` kept factored: ``B`` [out, k] carries every scale, ``A`` [k, in].

    ``energy`` is the share of the squared Frobenius norm of the matrix it approximates (1.0 when
    exact); ``singular_values`` are all singular values of that matrix, when an SVD made it.
    """

    B: torch.Tensor
    A: torch.Tensor
    energy: float = 1.0
    singular_values: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]

    def dense(self) -> torch.Tensor:
        """``B @ A`` in float32, [out, in]."""
        return self.B.float() @ self.A.float()


def energy_kept(singular_values: torch.Tensor, rank: int) -> float:
    """``sum_{j<rank} S_j^2 / sum_j S_j^2`` (1.0 for a zero matrix: nothing to lose)."""
    squares = singular_values.double().square()
    total = float(squares.sum())
    return 1.0 if total == 0.0 else float(squares[:rank].sum()) / total


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> LowRank:
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    return LowRank(
        B=(u[:, :k] * root).contiguous(), A=(root[:, None] * vh[:k]).contiguous(),
        energy=energy_kept(s, k), singular_values=s,
    )


def truncated_svd(matrix: torch.Tensor, rank: int) -> LowRank:
    """The best rank-``rank`` approximation of ``matrix`` [out, in] (capped at ``min(out, in)``).

    Example:
        >>> lr = truncated_svd(torch.randn(64, 32), 8); lr.B.shape, lr.A.shape
        (torch.Size([64, 8]), torch.Size([8, 32]))
    """
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return _split(u, s, vh, rank)


def truncated_svd_of_product(B: torch.Tensor, A: torch.Tensor, rank: int) -> LowRank:
    """:func:`truncated_svd` of ``B @ A`` (B [out, R], A [R, in]) without forming the product.

    ``B = Q_b R_b`` and ``A^T = Q_a R_a`` (thin QR), so ``B A = Q_b (R_b R_a^T) Q_a^T`` and only the
    small core is decomposed: O((out + in) R^2) instead of O(out * in * min(out, in)). The singular
    values past R are zero, so the energy is exact.
    """
    q_b, r_b = torch.linalg.qr(B.float())
    q_a, r_a = torch.linalg.qr(A.float().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return _split(q_b @ u, s, vh @ q_a.T, rank)
