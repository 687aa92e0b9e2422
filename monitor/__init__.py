"""Per-layer training-stability monitor for PyTorch.

    import monitor
    mon = monitor.watch(model, optimizer, logdir="runs/exp1", every=50)

Heavy submodules (torch) load on first use, so ``monitor.schema`` stays importable by the
dashboard without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from monitor.schema import METRIC_KEYS, PSSConfig

__version__ = "0.1.0"  # the one place: pyproject.toml reads it (setuptools dynamic version)
__all__ = ["watch", "Monitor", "MonitorConfig", "PSSConfig", "METRIC_KEYS", "__version__"]

_LAZY = {
    "watch": "monitor.hook",
    "Monitor": "monitor.hook",
    "MonitorConfig": "monitor.config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'monitor' has no attribute {name!r}")
