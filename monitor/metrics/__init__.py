"""Pure metric functions of tensors (SPEC section 2), one family per module.

``spectral`` (sigma_max, stable rank, top-k SVD), ``energy`` (SJE), ``ntk`` (per-layer cosine
NTK), ``norms`` (gradient / parameter norms, health counts, update ratio), ``views`` (which
tensors are layers, and their matrix views). :data:`REGISTRY` maps the metric keys of
``monitor.schema.METRIC_KEYS`` to the function that computes each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from monitor.metrics import energy, norms, ntk, spectral, views
from monitor.metrics.energy import sje
from monitor.metrics.norms import (global_grad_norm, global_norm, lr_effective, nonfinite_count,
                                   tensor_norms, update_ratio)
from monitor.metrics.ntk import cosine_top_eig
from monitor.metrics.ntk_capture import NTKCapture
from monitor.metrics.spectral import PowerResult, power_sigma_max, stable_rank, top_k_svd
from monitor.metrics.views import has_matrix_view, layer_kinds, matrix_view

#: metric key -> the function computing it. ``lr`` (the applied rate) is read from the
#: optimizer, not computed from tensors, so it has no entry.
REGISTRY: dict[str, Callable[..., Any]] = {
    "sigma_max": power_sigma_max,  # (M, v0) -> PowerResult; .sigma
    "stable_rank": stable_rank,  # (M, sigma) -> float
    "sje": sje,  # (M, G, k_max=, sigma=) -> (value, k)
    "ntk_eig": cosine_top_eig,  # (gram) -> float; the Gram comes from NTKCapture
    "grad_norm": tensor_norms,  # ([G]) -> [float]
    "param_norm": tensor_norms,  # ([W]) -> [float]
    "update_ratio": update_ratio,  # ([W_before], [W_after]) -> [float]
    "lr_effective": lr_effective,  # ([W_before], [W_after], [G]) -> [float]
}


def get(name: str) -> Callable[..., Any]:
    """The function computing metric ``name``; KeyError naming the known metrics otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; known: {sorted(REGISTRY)}") from None


__all__ = [
    "REGISTRY", "get", "energy", "norms", "ntk", "spectral", "views",
    "sje", "global_grad_norm", "global_norm", "lr_effective", "nonfinite_count", "tensor_norms",
    "update_ratio", "NTKCapture", "cosine_top_eig", "PowerResult", "power_sigma_max",
    "stable_rank", "top_k_svd", "has_matrix_view", "layer_kinds", "matrix_view",
]
