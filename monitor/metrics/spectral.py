"""Largest singular value, stable rank and top-k singular triplets (SPEC section 2).

Everything is computed in float32 whatever the input dtype. Random start vectors come from a
private generator with a fixed seed, so the monitor never consumes the training job's
global random stream (and results are reproducible).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EXACT_SVD_MAX_DIM = 512  # top_k_svd: full SVD when min(m, n) <= this, randomized otherwise


EXACT_SIGMA_MAX_DIM = 64  # power_sigma_max: exact float64 svdvals when min(m, n) <= this
#: extra weight of a fixed random direction mixed into a warm start, so that a new top
#: direction orthogonal to the previous one is still found (Krylov methods amplify it fast)
WARM_START_MIX = 1e-2
COLD_START_BLOCK = 4  # random vectors of the one block step that picks a cold start


@dataclass
class PowerResult:
    """Result of :func:`power_sigma_max`.

    ``sigma`` is 0.0 for a zero matrix and nan when ``M`` has non-finite entries; in both
    cases ``converged`` is False and the caller should record the metric as failed.

    Error bound: ``M v = sigma u`` holds by construction and ``‖Mᵀu - sigma v‖ = residual ·
    sigma``, so some singular value lies within ``residual · sigma`` of ``sigma`` (Weyl); the
    estimate is a Ritz value, hence a lower bound of sigma_1, and in practice the value it
    is closest to is sigma_1: ``0 <= (sigma_1 - sigma) / sigma <= residual``.
    """

    sigma: float  # estimate of sigma_1
    u: torch.Tensor  # (m,) left singular vector estimate
    v: torch.Tensor  # (n,) right singular vector estimate: pass it back as the next warm start
    iters: int  # Lanczos steps run (one step = one product with M and one with M^T)
    converged: bool  # residual <= tol before max_iters
    residual: float = math.nan  # ‖Mᵀu - sigma v‖ / sigma: bound on the relative error
    reason: str = ""  # why it did not converge ("" when it did)


def _generator(device: torch.device, seed: int = 0) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _as_matrix(M: torch.Tensor, name: str) -> torch.Tensor:
    if M.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D matrix, got shape {tuple(M.shape)} "
                         "(use monitor.metrics.views.matrix_view first)")
    return M.detach().to(torch.float32)


def power_sigma_max(M: torch.Tensor, v0: torch.Tensor | None = None, *, max_iters: int = 60,
                    tol: float = 2e-3) -> PowerResult:
    """sigma_1(M) by Lanczos bidiagonalization with a residual stopping rule, warm-started.

    Golub-Kahan-Lanczos (the Krylov method of ARPACK / PROPACK, full reorthogonalisation)
    builds orthonormal ``V_k`` (n, k), ``U_k`` (m, k) and an upper bidiagonal ``B_k`` with
    ``M V_k = U_k B_k`` and ``Mᵀ U_k = V_k B_kᵀ + β_k v_{k+1} e_kᵀ``. The top singular triplet
    ``(sigma, p, q)`` of ``B_k`` gives ``u = U_k p``, ``v = V_k q`` with ``M v = sigma u``
    exactly and ``‖Mᵀ u - sigma v‖ = β_k |p_k|`` (free). Stop when that residual is at most
    ``tol · sigma``; then ``0 <= (sigma_1 - sigma) / sigma <= tol`` (see :class:`PowerResult`).

    Why not plain power iteration: freshly initialised matrices have a nearly flat top
    spectrum (sigma_2 / sigma_1 ≈ 0.98 for a 1024² Gaussian), where power iteration needs
    hundreds of steps and a rule on the change of sigma stops early with an error of about
    ``tol / (1 - (sigma_2/sigma_1)²)``. Lanczos converges with the square root of the gap
    (about 19 steps for a 1024² Gaussian from a random start, 1-3 from the previous step's
    vector; benchmarks/results/metrics.md). Matrices with ``min(m, n) <=
    EXACT_SIGMA_MAX_DIM`` get an exact float64 SVD, which is cheaper there.

    ``v0`` is the previous step's right singular vector; a fixed-seed random direction is
    mixed in with weight WARM_START_MIX. When ``v0`` is None, of the wrong shape, non-finite
    or zero, the start is the best of COLD_START_BLOCK fixed-seed random vectors. Zero matrix: sigma 0.0 (no NaN, no exception).
    Non-finite entries: sigma nan. In both cases ``converged`` is False with a ``reason``.
    """
    if max_iters < 1:
        raise ValueError(f"power_sigma_max(max_iters={max_iters}): must be >= 1")
    if not tol > 0:
        raise ValueError(f"power_sigma_max(tol={tol}): must be > 0")
    M = _as_matrix(M, "power_sigma_max")
    m, n = M.shape
    if min(m, n) <= EXACT_SIGMA_MAX_DIM:
        return _exact_sigma_max(M)
    result = _lanczos(M, _start_vector(v0, M), min(max_iters, m, n), tol)
    if result.sigma == 0.0 and v0 is not None and bool((M != 0).any()):
        # the warm start fell into the null space: start again from a random vector
        result = _lanczos(M, _start_vector(None, M), min(max_iters, m, n), tol)
    return result


def _exact_sigma_max(M: torch.Tensor) -> PowerResult:
    """The exact top triplet from a float64 SVD (small matrices)."""
    m, n = M.shape
    if not bool(torch.isfinite(M).all()):
        return PowerResult(math.nan, M.new_zeros(m), M.new_zeros(n), 0, False, math.nan,
                           "the matrix has non-finite entries")
    U, S, Vh = torch.linalg.svd(M.to(torch.float64), full_matrices=False)
    sigma = float(S[0])
    if sigma == 0.0:
        return PowerResult(0.0, M.new_zeros(m), M.new_zeros(n), 0, False, math.nan,
                           "the matrix is zero")
    return PowerResult(sigma, U[:, 0].to(M.dtype), Vh[0].to(M.dtype), 0, True, 0.0)


def _lanczos(M: torch.Tensor, v: torch.Tensor, k_max: int, tol: float) -> PowerResult:
    """Golub-Kahan-Lanczos from the unit vector ``v``, at most ``k_max`` steps."""
    m, n = M.shape
    V = M.new_zeros(k_max + 1, n)  # rows: right Lanczos vectors
    U = M.new_zeros(k_max, m)  # rows: left Lanczos vectors
    alphas: list[float] = []
    betas: list[float] = []
    V[0] = v
    p = M @ v
    scale = 0.0
    for j in range(k_max):
        if j:
            p = _reorthogonalise(p - betas[-1] * U[j - 1], U[:j])
        alpha = float(torch.linalg.vector_norm(p))  # one sync per half-step
        if not math.isfinite(alpha):
            return _failed(M, math.nan, j + 1, "the matrix has non-finite entries")
        scale = max(scale, alpha)
        if alpha <= 1e-5 * scale:  # M v_j lies in span(U): the Krylov space is invariant
            if j == 0:
                return _failed(M, 0.0, 1, "M v = 0 (a zero matrix, or v in its null space)")
            result = _ritz(U[:j], V[:j + 1], _bidiagonal(alphas, betas, j, j + 1), 0.0)
            result.converged = True
            return result
        alphas.append(alpha)
        U[j] = p / alpha
        w = _reorthogonalise(M.t() @ U[j] - alpha * V[j], V[:j + 1])
        beta = float(torch.linalg.vector_norm(w))
        if not math.isfinite(beta):
            return _failed(M, math.nan, j + 1, "the matrix has non-finite entries")
        result = _ritz(U[:j + 1], V[:j + 1], _bidiagonal(alphas, betas, j + 1, j + 1), beta)
        if result.residual <= tol:
            result.converged = True
            return result
        betas.append(beta)
        V[j + 1] = w / beta
        if j + 1 < k_max:
            p = M @ V[j + 1]
    result.reason = (f"not converged in {k_max} Lanczos steps: relative residual "
                     f"{result.residual:.2e} > tol {tol:g} (estimate {result.sigma:.6g}, a lower "
                     f"bound within {100 * result.residual:.2g}%)")
    return result


def _reorthogonalise(x: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``x`` minus its projection on the rows of ``Q``, twice (classical Gram-Schmidt: "twice
    is enough" to keep the Lanczos vectors orthogonal in float32)."""
    if Q.shape[0] == 0:
        return x
    x = x - Q.t() @ (Q @ x)
    return x - Q.t() @ (Q @ x)


def _bidiagonal(alphas: list[float], betas: list[float], rows: int, cols: int) -> torch.Tensor:
    """``B`` (rows, cols) in float64: ``alphas`` on the diagonal, ``betas`` above it."""
    B = torch.zeros(rows, cols, dtype=torch.float64)
    for i in range(rows):
        if i < len(alphas):
            B[i, i] = alphas[i]
        if i + 1 < cols and i < len(betas):
            B[i, i + 1] = betas[i]
    return B


def _ritz(U: torch.Tensor, V: torch.Tensor, B: torch.Tensor, beta_last: float) -> PowerResult:
    """Top Ritz triplet of ``M ≈ U B Vᵀ`` restricted to the Krylov spaces, with its relative
    residual ``beta_last · |p_last| / sigma``."""
    P, S, Qh = torch.linalg.svd(B, full_matrices=False)
    sigma = float(S[0])
    residual = beta_last * abs(float(P[-1, 0])) / sigma
    u = P[:, 0].to(device=U.device, dtype=U.dtype) @ U
    v = Qh[0].to(device=V.device, dtype=V.dtype) @ V
    u, v = u / torch.linalg.vector_norm(u), v / torch.linalg.vector_norm(v)
    return PowerResult(sigma, u, v, V.shape[0], False, residual)


def _failed(M: torch.Tensor, sigma: float, iters: int, reason: str) -> PowerResult:
    m, n = M.shape
    return PowerResult(sigma, M.new_zeros(m), M.new_zeros(n), iters, False, math.nan, reason)


def _start_vector(v0: torch.Tensor | None, M: torch.Tensor) -> torch.Tensor:
    """Unit start vector: ``v0`` plus WARM_START_MIX of a fixed random direction, or, when
    ``v0`` is unusable, the top Ritz vector of one block power step on COLD_START_BLOCK
    random vectors (the best of several random starts: a single one can lack sigma_1's
    direction, and Lanczos then stalls on sigma_2 with a small residual)."""
    n = M.shape[1]
    gen = _generator(M.device)
    if v0 is not None and v0.shape == (n,):
        v = v0.detach().to(device=M.device, dtype=torch.float32)
        norm = float(torch.linalg.vector_norm(v))
        if math.isfinite(norm) and norm > 0:
            r = torch.randn(n, device=M.device, generator=gen)
            v = v / norm + WARM_START_MIX * r / torch.linalg.vector_norm(r)
            return v / torch.linalg.vector_norm(v)
    omega = torch.randn(n, min(COLD_START_BLOCK, n), device=M.device, generator=gen)
    Z = M.t() @ torch.linalg.qr(M @ omega).Q  # (n, b): Qᵀ M = Zᵀ
    gram = (Z.t() @ Z).double()
    if not (bool(torch.isfinite(gram).all()) and float(gram.abs().max()) > 0):
        return omega[:, 0] / torch.linalg.vector_norm(omega[:, 0])  # Lanczos reports it
    _, vecs = torch.linalg.eigh(gram)  # ascending
    v = Z @ vecs[:, -1].to(Z.dtype)
    return v / torch.linalg.vector_norm(v)


def stable_rank(M: torch.Tensor, sigma: float) -> float:
    """``SR(M) = ‖M‖_F² / sigma²`` with ``sigma`` = sigma_1(M); in [1, rank(M)].

    Raises ValueError when ``sigma`` is not a positive finite number (zero or broken matrix).
    """
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"stable_rank: sigma_max must be positive and finite, got {sigma}")
    fro2 = float(M.detach().to(torch.float32).pow(2).sum().item())
    return fro2 / (sigma * sigma)


def k_of_stable_rank(sr: float, rank_bound: int, k_max: int | None = None) -> int:
    """The top-k cutoff of SJE and PSS: ``k = min(max(1, floor(SR)), rank_bound, k_max)``.

    Defined once here (SPEC 2, 3). ``SR`` is raised by a relative 1e-6 before the floor, so
    that a stable rank that is an integer in exact arithmetic (an orthogonal n x n matrix has
    SR = n) is not floored to n - 1 by float32 rounding.
    """
    k = max(1, min(int(math.floor(sr * (1 + 1e-6))), rank_bound))
    return k if k_max is None else min(k, k_max)


def top_k_svd(M: torch.Tensor, k: int, *, oversample: int | None = None,
              niter: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets ``(U_k (m,k), S_k (k,), V_k (n,k))`` of M, in float32.

    Exact when ``min(m, n) <= EXACT_SVD_MAX_DIM``: ``eigh`` of the smaller Gram matrix in
    float64 (measured 0.1 s against 9 s for ``torch.linalg.svd`` of a 512 x 2048 matrix on
    CPU; float64 keeps singular values down to ~1e-8 sigma_1 accurate); otherwise a
    randomized range finder (Halko, Martinsson and Tropp 2011, as ``torch.svd_lowrank``) with
    ``k + oversample`` columns (default oversample ``max(10, k)``) and ``niter`` power
    iterations, QR-re-orthonormalised, from a fixed-seed private generator.
    """
    M = _as_matrix(M, "top_k_svd")
    m, n = M.shape
    r = min(m, n)
    if not 1 <= k <= r:
        raise ValueError(f"top_k_svd(k={k}): must be in [1, min(m, n) = {r}]")
    if r <= EXACT_SVD_MAX_DIM:
        return _top_k_gram(M, k)
    q = min(r, k + (max(10, k) if oversample is None else oversample))
    omega = torch.randn(n, q, device=M.device, generator=_generator(M.device))
    Q = torch.linalg.qr(M @ omega).Q  # (m, q)
    for _ in range(niter):
        Q = torch.linalg.qr(M.t() @ Q).Q  # (n, q)
        Q = torch.linalg.qr(M @ Q).Q  # (m, q)
    B = Q.t() @ M  # (q, n)
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    return (Q @ Ub[:, :k]), S[:k], Vh[:k].t()


def _top_k_gram(M: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k triplets from the eigendecomposition of the smaller of M Mᵀ and Mᵀ M (float64)."""
    A = M.to(torch.float64)
    wide = A.shape[0] <= A.shape[1]
    gram = A @ A.t() if wide else A.t() @ A
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    S = evals.flip(0)[:k].clamp_min(0).sqrt()
    X = evecs.flip(1)[:, :k]  # the singular vectors of the small side
    inv = torch.where(S > 0, 1.0 / S, torch.zeros_like(S))
    Y = (A.t() @ X if wide else A @ X) * inv  # the other side: Mᵀ u / sigma or M v / sigma
    U, V = (X, Y) if wide else (Y, X)
    return U.to(torch.float32), S.to(torch.float32), V.to(torch.float32)
