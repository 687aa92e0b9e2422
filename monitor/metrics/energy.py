"""Stable Jacobian energy (SJE), SPEC section 2.

The fraction of the gradient's energy that lies in the dominant singular subspace of the
weight (PSS paper, OpenReview LNYL96VIsD; the two-sided projection is our reading):

    SJE(M, G) = ‖U_kᵀ G V_k‖_F² / ‖G‖_F²,     k = min(max(1, floor(SR(M))), k_max)

An update in this subspace changes the dominant singular values, to first order
``Δσ_i ≈ -η u_iᵀ G v_i``. The paper reports SJE above about 0.8 before loss explosions.
"""

from __future__ import annotations

import math

import torch

from monitor.metrics.spectral import k_of_stable_rank, power_sigma_max, stable_rank, top_k_svd

#: power iterations of the randomized top-k SVD (matrices with min(m, n) > 512 only). On a
#: 600 x 700 matrix with spectrum logspace(0, -3) (k = 43, a 1.2% gap after sigma_k) the SJE
#: error against a full SVD is 3e-3 with 2, 2.4e-4 with 4, 1.5e-5 with 6, 1.2e-6 with 8.
SJE_NITER = 6


def sje(M: torch.Tensor, G: torch.Tensor, *, k_max: int = 64,
        sigma: float | None = None, sr: float | None = None) -> tuple[float, int]:
    """SJE of gradient ``G`` for weight ``M`` (both matrix views of the same shape).

    Returns ``(value, k)``; ``k`` is the cutoff used, which is below ``floor(SR)`` when capped
    at ``k_max`` (log it). ``sigma`` is sigma_1(M) when the caller has it (power iteration);
    otherwise it is computed. ``sr`` is the stable rank the caller logged: pass it so that k
    is the one of the logged value (k from :func:`monitor.metrics.spectral.k_of_stable_rank`).
    The value is clipped to at most 1 (rounding).

    Raises ValueError when the gradient is zero (SJE is 0/0), has non-finite entries, or when
    M has no positive finite sigma_1: the caller records the metric as failed.
    """
    if M.ndim != 2 or M.shape != G.shape:
        raise ValueError(f"sje: M and G must be matrices of the same shape, got "
                         f"{tuple(M.shape)} and {tuple(G.shape)}")
    if k_max < 1:
        raise ValueError(f"sje(k_max={k_max}): must be >= 1")
    M = M.detach().to(torch.float32)
    G = G.detach().to(device=M.device, dtype=torch.float32)
    g2 = float(G.pow(2).sum().item())
    if not math.isfinite(g2):
        raise ValueError("SJE undefined: the gradient has non-finite entries")
    if g2 == 0.0:
        raise ValueError("SJE undefined: the gradient is zero")
    if sr is None:
        sr = stable_rank(M, power_sigma_max(M).sigma if sigma is None else sigma)
    k = k_of_stable_rank(sr, min(M.shape), k_max)
    U, _, V = top_k_svd(M, k, niter=SJE_NITER)
    projected = U.t() @ G @ V  # (k, k)
    value = float(projected.pow(2).sum().item()) / g2
    return min(value, 1.0), k
