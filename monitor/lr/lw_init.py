"""Layer-wise learning rates chosen at initialization (LW-init, SPEC 4).

"Initializing the Layer-wise Learning Rate" (OpenReview ATCanNIk1H, 2024): before any
optimizer step, run ``T`` minibatches (model in train mode, gradients zeroed between
batches) and measure each tensor's mean absolute gradient per parameter::

    G_l = (1/T) sum_t ||g_l^t||_1 / numel(theta_l)

The multiplier is ``m_l = max(G_l, eps)^(-1/2)``, **normalised so that the arithmetic mean
of the multipliers over all measured tensors is 1**, and it stays fixed for all of
training.

Which tensors enter the mean. The paper's Algorithm 1 (lines 10-11, as its reviewers
describe them) rescales the raw rates so that their sum cancels out: ``sum_l m_l`` equals
the number of rates assigned, i.e. the mean is 1 over every tensor that gets a rate. We
follow that, biases and norm gains included, since each of them gets its own rate. The
consequence: biases' gradients per entry are larger than the weights', so their
multipliers are below 1 and the weight matrices' average above 1 (measured on ReLU MLPs
of width 256 with biases, default init, 3 seeds: 1.24-1.25 at depth 4, 1.44 at depth 8),
i.e. the weights train faster than the base ``lr`` on average. ``normalize_over=`` (names) takes
the mean over those tensors only, e.g. the weight matrices, so that ``lr`` is their
average rate. An LR sweep absorbs either choice (it changes one global factor): ``lr_l = lr * m_l``, one param group per tensor (named after it), so any
``torch.optim`` optimizer and LR scheduler work unchanged (a scheduler scales every
group's lr by the same factor, keeping the ratios).

    G = measure_init_gradients(model, loader, loss_fn, T=10)
    groups = lw_init_param_groups(model, lw_init_multipliers(G), lr=0.1)
    opt = torch.optim.SGD(groups, momentum=0.9)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["measure_init_gradients", "lw_init_multipliers", "lw_init_param_groups"]


def measure_init_gradients(model: nn.Module, batches: Iterable[Any],
                           loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
                           T: int = 10) -> dict[str, float]:
    """``G_l`` for every trainable tensor, averaged over the first ``T`` batches.

    ``batches`` yields ``(inputs, targets)``; the loss is ``loss_fn(model(inputs), targets)``.
    The model is left as it was: train/eval mode, gradients (set back to what they were)
    and buffers (BatchNorm running statistics) are restored; weights are never changed.
    """
    if T < 1:
        raise ValueError(f"measure_init_gradients(T={T}): need at least one minibatch")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("measure_init_gradients: the model has no trainable parameters")
    was_training = model.training
    saved_grads = [p.grad for _, p in named]
    saved_buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    sums = {n: 0.0 for n, _ in named}
    count = 0
    try:
        model.train()
        for inputs, targets in batches:
            if count == T:
                break
            for _, p in named:
                p.grad = None
            loss_fn(model(inputs), targets).backward()
            for n, p in named:
                if p.grad is not None:
                    sums[n] += p.grad.detach().abs().sum().item() / p.numel()
            count += 1
    finally:
        model.train(was_training)
        for (_, p), g in zip(named, saved_grads):
            p.grad = g
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in saved_buffers:
                    b.copy_(saved_buffers[n])
    if count < T:
        raise ValueError(f"measure_init_gradients: asked for T={T} minibatches but the "
                         f"iterable gave only {count}")
    return {n: s / T for n, s in sums.items()}


def lw_init_multipliers(grad_means: dict[str, float], eps: float = 1e-12,
                        normalize_over: Iterable[str] | None = None) -> dict[str, float]:
    """``m_l = max(G_l, eps)^(-1/2)``, scaled so that ``mean_l m_l = 1`` over all tensors,
    or over the names in ``normalize_over`` only (every tensor still gets a multiplier).

    Tensors whose gradient is (near) zero at init hit the ``eps`` clamp and get the largest
    multipliers; that is the paper's rule, not a bug, but check them (an unused tensor
    shows up here)."""
    if not grad_means:
        raise ValueError("lw_init_multipliers: no gradient magnitudes given")
    if not eps > 0:
        raise ValueError(f"lw_init_multipliers(eps={eps!r}): must be > 0")
    raw = {n: max(float(g), eps) ** -0.5 for n, g in grad_means.items()}
    over = list(raw) if normalize_over is None else list(dict.fromkeys(normalize_over))
    unknown = [n for n in over if n not in raw]
    if not over or unknown:
        raise ValueError(f"lw_init_multipliers(normalize_over=...): names not measured: "
                         f"{unknown[:5] or '(empty)'}; pass names of grad_means, e.g. "
                         "[n for n, p in model.named_parameters() if p.ndim >= 2]")
    mean = sum(raw[n] for n in over) / len(over)
    return {n: m / mean for n, m in raw.items()}


def lw_init_param_groups(model: nn.Module, multipliers: dict[str, float], lr: float,
                         **group_opts: Any) -> list[dict[str, Any]]:
    """One param group per tensor: ``{"params": [p], "lr": lr * m, "name": name,
    "lw_multiplier": m, **group_opts}`` in ``named_parameters()`` order.

    Every trainable tensor must have a multiplier (a missing one is an error naming it), so
    that no tensor silently trains at the plain rate."""
    groups = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name not in multipliers:
            raise KeyError(f"lw_init_param_groups: no multiplier for {name!r}; measure it "
                           "with measure_init_gradients on this model, or freeze it")
        m = float(multipliers[name])
        groups.append({"params": [p], "lr": lr * m, "name": name, "lw_multiplier": m,
                       **group_opts})
    return groups
