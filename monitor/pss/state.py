"""Forgetting the direction an optimizer remembers for a smoothed tensor (PSS option).

After smoothing, a weight's momentum points along a path the matrix has just left. The
option ``reset_optimizer_state`` forgets that *direction* and keeps the *scale*: it zeroes
the first moment (Adam-family ``exp_avg``, SGD's ``momentum_buffer``) and keeps the second
moment (``exp_avg_sq``, ``max_exp_avg_sq``) and the step count.

Why not drop the whole state (the design before issue 11): a fresh Adam's first step is
``lr · g / |g| = lr · sign(g)`` per entry, the largest step Adam ever takes, right after a
spike. Measured on the PSS benchmark's testbed (``benchmarks/results/pss.md``, "Resetting
optimizer state"), that step was several times the steady-state update. With the second
moment kept, Adam's next update is

    lr · (1 - β1) g / (1 - β1^t) / (sqrt(v̂_t) + eps)

about ``1 - β1`` (0.1) of a steady-state update whose gradient is typical for ``v``, growing
back as the first moment refills: a cautious restart instead of a jump. SGD's momentum
restarts from the gradient (``buf = g``), as on its first step.

State under other keys (other optimizers) is left alone: forgetting a state we do not
understand could produce the same unbounded first step.
"""

from __future__ import annotations

import torch

#: per-parameter state entries that hold a remembered direction (a first moment)
FIRST_MOMENT_KEYS = ("exp_avg", "momentum_buffer")


def reset_optimizer_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> bool:
    """Zero ``optimizer``'s first moment of ``param``; returns whether there was one.

    The second moment and the step count stay (see the module docstring); other
    parameters' state is untouched.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"reset_optimizer_state(optimizer=...): expected a torch.optim.Optimizer, "
                        f"got {type(optimizer).__name__}")
    state = optimizer.state.get(param)
    if not state:
        return False
    found = False
    for key in FIRST_MOMENT_KEYS:
        value = state.get(key)
        if isinstance(value, torch.Tensor):
            value.zero_()
            found = True
    return found
