"""Layer-wise learning rates from three papers (SPEC 4), logged as applied by the monitor.

- LW-init (``lw_init``): fixed per-tensor multipliers from gradient magnitudes at init,
  as param groups of any ``torch.optim`` optimizer.
- LARS, LAMB, TVLARS (``lars``): optimizers that store the trust ratio they applied in
  ``optimizer.state[p]["trust_ratio"]``, so ``lr/<name>`` is the true per-tensor rate.
- Architecture-aware scaling (``arch_scaling``): ``lr_scale(base, target)`` from
  ``sum_p L_p^3`` over the ``torch.fx`` DAG, and the matching ``arch_aware_init_``.

Names load on first use, so ``import monitor.lr`` costs nothing until one is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "measure_init_gradients": "monitor.lr.lw_init",
    "lw_init_multipliers": "monitor.lr.lw_init",
    "lw_init_param_groups": "monitor.lr.lw_init",
    "LARS": "monitor.lr.lars",
    "LAMB": "monitor.lr.lars",
    "TVLARS": "monitor.lr.lars",
    "tvlars_factor": "monitor.lr.lars",
    "warmup_cosine": "monitor.lr.lars",
    "warmup_cosine_factor": "monitor.lr.lars",
    "LayerDAG": "monitor.lr.arch_scaling",
    "UntraceableModelError": "monitor.lr.arch_scaling",
    "NoPathError": "monitor.lr.arch_scaling",
    "trace_layers": "monitor.lr.arch_scaling",
    "path_moments": "monitor.lr.arch_scaling",
    "path_cube_sum": "monitor.lr.arch_scaling",
    "kernel_size": "monitor.lr.arch_scaling",
    "lr_scale": "monitor.lr.arch_scaling",
    "arch_aware_init_": "monitor.lr.arch_scaling",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'monitor.lr' has no attribute {name!r}")
