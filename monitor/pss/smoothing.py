"""Smoothing the dominant singular values of a weight (PSS, SPEC section 3).

Paper: "Large Learning Rates without the Agonizing Pain: Dispelling the Curse of
Singularities in Deep Neural Networks" (OpenReview LNYL96VIsD, 2024; arXiv 2602.01308).

With ``k = max(1, floor(SR))`` and the top-k triplets ``U_k Σ_k V_kᵀ`` of the matrix view M,

    M* = M - U_k Σ_k V_kᵀ + U_k f(Σ_k) V_kᵀ

so only the dominant singular values change and the tail is kept exactly. Every ``f``
returns a non-increasing, non-negative vector whose first value is at most ``σ1``.

The singularity gap, and ``k_min``: as a layer approaches a singularity its stable rank
falls towards 1, so the paper's ``k = floor(SR)`` becomes 1, and every ``f`` leaves a single
value unchanged (conv and softmax keep the sum of one value; log, softplus and clip compress
towards ``σ_k = σ1``). With ``k = 1`` PSS does nothing exactly when it should act (measured
in issue 11: median weight change 0.0000 per intervention). Our reading (SPEC 3): the
automatic ``k`` is at least ``k_min = 2`` (at most ``min(shape)``), so every function sees
``σ2`` as the neighbour of ``σ1``: conv (window 3) ``σ1 -> (2 σ1 + σ2) / 3`` and
``σ2 -> (σ1 + 2 σ2) / 3``; softmax shares the sum of both; log and softplus compress the
excess ``σ1 - σ2``; clip sets ``σ1 = σ2``. ``k_min = 1`` restores the paper's rule. An
explicit ``k`` is used as given.
"""

from __future__ import annotations

import math

import torch

from monitor.metrics import spectral, views
from monitor.schema import C_RANGE, PSS_METHODS

#: power iterations of the randomized range finder on matrices too large for the exact path;
#: enough that the top-k subspace is accurate on slowly decaying spectra (see tests)
RANDOMIZED_NITER = 8


def smoothing_function(s: torch.Tensor, method: str, *, window: int = 3,
                       temperature: float | None = None, c: float | None = None) -> torch.Tensor:
    """``f(s)`` for the top-k singular values ``s`` (descending), per SPEC 3.

    - ``conv``: moving average over ``2h + 1`` values, ``h = min(window // 2, k - 1)``, with
      half-sample-symmetric edges (``s_{-j} = s_{j-1}``, ``s_{k-1+j} = s_{k-j}``). The
      averaging matrix is doubly stochastic, so the sum is kept and ``f_0 <= σ1``. It stays
      non-increasing because ``h <= k - 1``: moving the window from i to i + 1 drops the
      value at index ``i - h`` (reflected: ``h - i - 1``) and adds the one at ``i + h + 1``
      (reflected: ``2k - i - h - 2``); the dropped index is never the larger, so the dropped
      value is never the smaller (``h - i - 1 <= 2k - i - h - 2`` iff ``h <= k - 1/2``).
      A wider window would reflect twice: ``[10, 5]`` with window 5 would give ``[7, 8]``.
    - ``softmax``: ``sum(s) · softmax(s / T)``; ``T`` defaults to ``σ1`` and is raised to
      ``σ1`` when smaller (a lower temperature would sharpen: ``f_0`` could exceed ``σ1``).
      Keeps the sum; largest / smallest <= e.
    - ``log``: ``σ_k + c · log(1 + (s - σ_k) / c)``, ``c`` defaults to ``σ_k`` (or ``σ1``
      when ``σ_k`` is 0): compresses the excess over the k-th value.
    - ``softplus``: ``σ_k + c · (softplus(1) - softplus(1 - (s - σ_k) / c))``: a smooth
      saturation of the excess (slope 1/(1+e^-1) ≈ 0.73 at the k-th value, bounded by
      ``c · log(1 + e)``), same default ``c``.
    - ``clip``: every value set to ``σ_k``.
    """
    if method not in PSS_METHODS:
        raise ValueError(f"smoothing method {method!r}: expected one of {PSS_METHODS}")
    s = s.to(torch.float64)
    k = s.numel()
    if k == 0:
        return s
    s_k = s[-1]
    if method == "conv":
        if not (isinstance(window, int) and window >= 1 and window % 2 == 1):
            raise ValueError(f"conv window={window!r}: expected an odd integer >= 1")
        # h <= k - 1: the reflection never reaches past the far edge; with h = k a window
        # near the top would see the bottom's reflection and the result could increase
        h = min(window // 2, k - 1)
        idx = torch.arange(-h, k + h)
        idx = torch.where(idx < 0, -idx - 1, idx)
        idx = torch.where(idx >= k, 2 * k - 1 - idx, idx)
        f = s[idx].unfold(0, 2 * h + 1, 1).mean(dim=1)
        total = f.sum()
        return f * (s.sum() / total) if total > 0 else f  # exact sum despite rounding
    if method == "softmax":
        T = s[0] if temperature is None else max(float(temperature), float(s[0]))
        if T <= 0:
            return s.clone()
        return s.sum() * torch.softmax(s / T, dim=0)
    if c is not None and not C_RANGE[0] <= c <= C_RANGE[1]:  # tiny c overflows (s - s_k) / c
        raise ValueError(f"smoothing c={c!r}: expected None or a number in "
                         f"[{C_RANGE[0]:g}, {C_RANGE[1]:g}]")
    scale = float(c) if c is not None else float(s_k if s_k > 0 else s[0])
    if method == "log":
        if scale <= 0:
            return s.clone()
        return s_k + scale * torch.log1p((s - s_k) / scale)
    if method == "softplus":
        if scale <= 0:
            return s.clone()
        sp = torch.nn.functional.softplus
        one = torch.ones((), dtype=s.dtype)
        return s_k + scale * (sp(one) - sp(1 - (s - s_k) / scale))
    return torch.full_like(s, float(s_k))  # clip


def default_k(M: torch.Tensor, sigma_max: float) -> int:
    """``max(1, floor(stable rank))``, at most ``min(M.shape)``."""
    sr = spectral.stable_rank(M, sigma_max) if sigma_max > 0 else 1.0
    return spectral.k_of_stable_rank(sr, min(M.shape))


def weight_from_matrix(M: torch.Tensor, like: torch.Tensor, kind: str) -> torch.Tensor:
    """Inverse of :func:`monitor.metrics.views.matrix_view`: shape and dtype of ``like``."""
    W = M.t() if kind == "conv1d_hf" else M
    return W.reshape(like.shape).to(like.dtype)


def smooth_matrix(M: torch.Tensor, method: str, k: int | None = None, *, k_min: int = 2,
                  k_max: int | None = None, **params) -> tuple[torch.Tensor, dict[str, float]]:
    """Smooth a 2-D matrix; returns ``(M*, info)`` with info k, σ1 and SR before and after.

    The automatic ``k`` (when ``k`` is None) is at least ``k_min`` and at most ``min(shape)``;
    ``k_max`` caps any ``k``.
    """
    if not (isinstance(k_min, int) and not isinstance(k_min, bool) and k_min >= 1):
        raise ValueError(f"smooth(k_min={k_min!r}): expected an integer >= 1")
    M = M.detach().to(torch.float32)
    if not torch.isfinite(M).all():
        raise ValueError("cannot smooth a matrix with non-finite entries")
    r = min(M.shape)
    if k is None:
        top = spectral.power_sigma_max(M, max_iters=100, tol=1e-6).sigma
        k = min(max(default_k(M, top), k_min), r)
    if k_max is not None:
        k = min(k, k_max)
    if not (isinstance(k, int) and 1 <= k <= r):
        raise ValueError(f"smooth(k={k!r}): expected an integer in [1, min(shape) = {r}]")
    U, S, V = spectral.top_k_svd(M, k, niter=RANDOMIZED_NITER)
    f = smoothing_function(S, method, **params).to(torch.float32)
    M_new = M + (U * (f - S)) @ V.t()  # M - U S Vᵀ + U f Vᵀ, tail untouched
    fro2 = float(M.pow(2).sum())
    sigma_after = spectral.power_sigma_max(M_new, V[:, 0], max_iters=100, tol=1e-6).sigma
    info = {"k": float(k), "sigma_before": float(S[0]), "sigma_after": sigma_after,
            "sr_before": fro2 / float(S[0]) ** 2 if S[0] > 0 else math.nan,
            "sr_after": float(M_new.pow(2).sum()) / sigma_after ** 2 if sigma_after > 0 else math.nan}
    return M_new, info


def smooth(weight: torch.Tensor, method: str = "conv", k: int | None = None, *,
           kind: str = "other", k_min: int = 2, **params) -> torch.Tensor:
    """Return ``weight`` with its top-k singular values smoothed by ``method`` (SPEC 3).

    Args:
        weight: any tensor with ndim >= 2; the matrix view follows ``kind`` (SPEC 1:
            ``linear``, ``conv1d_hf`` (transposed), ``conv``, ``embedding``, ``other``).
        method: ``conv``, ``softmax``, ``log``, ``softplus`` or ``clip``.
        k: how many singular values to smooth; default ``max(k_min, floor(stable rank))``
            (at most ``min(shape)``).
        k_min: the least automatic ``k`` (default 2, our reading, SPEC 3; 1 is the paper's
            ``floor(SR)``, which does nothing once SR < 2, see the module docstring).
        params: the method's parameters: ``window`` (conv), ``temperature`` (softmax),
            ``c`` (log, softplus).

    The result has the input's shape and dtype; the computation runs in float32.
    """
    M = views.matrix_view(weight, kind)
    M_new, _ = smooth_matrix(M, method, k, k_min=k_min, **params)
    return weight_from_matrix(M_new, weight, kind)
