"""The linear algebra of the paper's section 7, in plain torch (float64 throughout).

* ``low_rank_svd``: the exact thin SVD of a LoRA update s·B·A from its factors, without forming the
  (out × in) matrix first: QR of B and of Aᵀ leaves an r × r core to decompose.
* ``energy`` and ``effective_rank``: how the update's Frobenius norm spreads over its directions.
* ``projection_fro``: ‖Uᵀ W V‖_F, how much of W lies in the subspaces U (out × r) and V (in × r); with
  ΔW's own singular vectors, W's top ones, or random orthonormal ones (the paper's Table 7).
* ``subspace_similarity``: the grid φ(i, j) = ‖U_iᵀ U_j‖_F² / min(i, j) between the top-i and top-j
  directions of two bases (the paper's Figures 3 and 4); 1 for nested subspaces, 0 for orthogonal ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DTYPE = torch.float64


@dataclass(frozen=True)
class Svd:
    """A thin SVD M = U diag(S) Vᵀ: U (out × k), S (k,) descending, V (in × k)."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor


def low_rank_svd(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> Svd:
    """The thin SVD of ``scale · b @ a`` (b: out × r, a: r × in), with min(r, out, in) terms.

    B = Q_B R_B and Aᵀ = Q_A R_A give s·BA = Q_B (s·R_B R_Aᵀ) Q_Aᵀ; the SVD of the small core, rotated
    back by Q_B and Q_A, is the SVD of the whole update (exact up to rounding, in float64)."""
    b, a = b.to(DTYPE), a.to(DTYPE)
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.t())
    u_core, s, vh_core = torch.linalg.svd(scale * (r_b @ r_a.t()), full_matrices=False)
    return Svd(q_b @ u_core, s, q_a @ vh_core.t())


def matrix_svd(m: torch.Tensor) -> Svd:
    """The thin SVD of a dense matrix, in float64."""
    u, s, vh = torch.linalg.svd(m.to(DTYPE), full_matrices=False)
    return Svd(u, s, vh.t())


def energy(s: torch.Tensor) -> torch.Tensor:
    """Cumulative share of ‖M‖_F² = Σσ² held by the first k singular values, k = 1..len(s); zeros for
    a zero matrix (it has no energy to share)."""
    sq = s.to(DTYPE) ** 2
    total = sq.sum()
    return torch.cumsum(sq, 0) / total if total > 0 else torch.zeros_like(sq)


def effective_rank(s: torch.Tensor) -> float:
    """exp of the Shannon entropy of p_i = σ_i / Σσ (Roy & Vetterli, 2007): k for k equal non-zero
    singular values, 1 for a rank-one matrix, 0 for a zero matrix."""
    s = s.to(DTYPE)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * torch.log(p)).sum()))


def projection_fro(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> float:
    """‖Uᵀ W V‖_F for W (out × in), U (out × r), V (in × r)."""
    return float(torch.linalg.matrix_norm(u.to(DTYPE).t() @ w.to(DTYPE) @ v.to(DTYPE)))


def random_orthonormal(n: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """An n × r matrix with orthonormal columns spanning a uniformly random r-dimensional subspace
    (QR of a Gaussian matrix, signs fixed so the distribution is the Haar one)."""
    q, rr = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=DTYPE))
    signs = torch.sign(torch.diagonal(rr))
    signs[signs == 0] = 1.0
    return q * signs


def random_projection_fro(w: torch.Tensor, r: int, draws: int = 10, seed: int = 0) -> float:
    """Mean of ‖Uᵀ W V‖_F over ``draws`` seeded draws of random orthonormal U (out × r), V (in × r)."""
    gen = torch.Generator().manual_seed(seed)
    out, inp = w.shape
    total = 0.0
    for _ in range(draws):
        total += projection_fro(w, random_orthonormal(out, r, gen), random_orthonormal(inp, r, gen))
    return total / draws


def row_space_basis(a: torch.Tensor) -> torch.Tensor:
    """The right singular vectors of ``a`` (r × in) as columns (in × r), by descending singular value:
    the orthonormal basis of A's row space the paper's φ compares."""
    return torch.linalg.svd(a.to(DTYPE), full_matrices=False)[2].t()


def subspace_similarity(basis_a: torch.Tensor, basis_b: torch.Tensor) -> torch.Tensor:
    """φ(i, j) = ‖U_iᵀ U_j‖_F² / min(i, j) for i = 1..r_a, j = 1..r_b, where U_i is the first i columns
    of ``basis_a`` (n × r_a) and U_j the first j of ``basis_b`` (n × r_b); an r_a × r_b grid in [0, 1].

    ‖U_iᵀ U_j‖_F² is the sum of the squared entries of the top-left i × j block of G = U_aᵀ U_b, so one
    product and a 2-D cumulative sum give the whole grid."""
    g = (basis_a.to(DTYPE).t() @ basis_b.to(DTYPE)) ** 2
    sums = torch.cumsum(torch.cumsum(g, 0), 1)
    i = torch.arange(1, g.shape[0] + 1, dtype=DTYPE)[:, None]
    j = torch.arange(1, g.shape[1] + 1, dtype=DTYPE)[None, :]
    return sums / torch.minimum(i, j)


def random_subspace_similarity(n: int, r_a: int, r_b: int, seed: int = 0) -> torch.Tensor:
    """The φ grid for two seeded random Gaussian matrices of shapes r_a × n and r_b × n (the chance
    level; its expectation is max(i, j) / n)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(r_a, n, generator=gen, dtype=DTYPE)
    b = torch.randn(r_b, n, generator=gen, dtype=DTYPE)
    return subspace_similarity(row_space_basis(a), row_space_basis(b))


def truncated_factors(svd: Svd, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B′, A′) with B′ A′ = U_k diag(σ_k) V_kᵀ, the best rank-k approximation (Eckart–Young): the
    singular values split evenly, B′ = U_k √σ (out × k) and A′ = √σ V_kᵀ (k × in), so neither factor
    carries the whole scale."""
    root = torch.sqrt(svd.s[:k])
    return svd.u[:, :k] * root, root[:, None] * svd.v[:, :k].t()


def tail_error(s: torch.Tensor, k: int) -> float:
    """‖M − M_k‖_F / ‖M‖_F = sqrt(Σ_{i>k} σ_i²) / sqrt(Σ σ_i²); 0 for a zero matrix."""
    sq = s.to(DTYPE) ** 2
    total = float(sq.sum())
    return math.sqrt(float(sq[k:].sum()) / total) if total > 0 else 0.0
