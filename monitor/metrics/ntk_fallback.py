"""Per-sample gradients of weights used functionally, by re-running their owner module.

``nn.MultiheadAttention`` hands ``in_proj_weight`` and ``out_proj.weight`` to
``F.multi_head_attention_forward``; no module hook sees those products, so the T² trick of
:mod:`monitor.metrics.ntk` cannot be used. What a hook does see is the owner module's input
``x`` and the gradient ``δ`` of the training loss with respect to its output. For an owner
whose output for sample i depends on sample i only,

    g_i = ∂/∂W ⟨owner(x_i), δ_i⟩      (a vector-Jacobian product)

is exactly sample i's gradient of the training loss with respect to W through that owner.
:func:`per_sample_grads` evaluates it with one forward and backward of the owner per probe
sample. The capture side (hooks) is :class:`monitor.metrics.ntk_capture.NTKCapture`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Slot:
    """One argument of a captured call: a tensor cut to the probe along ``dim`` (``rows``
    entries per sample), or any other value passed through unchanged (``dim`` None)."""

    value: Any
    dim: int | None = None
    rows: int = 1

    def sample(self, i: int) -> Any:
        if self.dim is None:
            return self.value
        return self.value.narrow(self.dim, i * self.rows, self.rows)


@dataclass
class OwnerCall:
    """One call of an owner module during the captured forward."""

    module: nn.Module
    args: list[Slot]
    kwargs: dict[str, Slot]
    batch: int  # the batch size of the call (before keeping the probe)
    out_dims: list[int]  # batch dimension of each tensor output
    deltas: list[torch.Tensor | None] = field(default_factory=list)  # probe part of each δ


def tensors_of(output: Any) -> list[torch.Tensor]:
    """The tensors of a module output (a tensor, a tuple / list, a mapping such as HF's
    ``ModelOutput``), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in tensors_of(item)]
    return []


def batch_layout(module: nn.Module, args: tuple, kwargs: dict) -> tuple[int, Callable]:
    """``(batch size, dim_of)``: ``dim_of(name, tensor)`` gives a tensor argument's batch
    dimension and rows per sample, or None when the batch shares it.

    nn.MultiheadAttention: query / key / value (and the attention output) are (L, N, E)
    unless ``batch_first``; ``key_padding_mask`` is (N, S); a 3-D ``attn_mask`` is
    (N · heads, L, S); a 2-D one is shared. Any other module: dimension 0.
    """
    if isinstance(module, nn.MultiheadAttention):
        query = args[0] if args else kwargs["query"]
        seq_first = query.ndim == 3 and not module.batch_first
        batch = query.shape[1 if seq_first else 0]

        def dim_of(name: str, t: torch.Tensor) -> tuple[int, int] | None:
            if name in ("0", "1", "2", "query", "key", "value"):
                return (1 if seq_first else 0), 1
            if name == "key_padding_mask":
                return 0, 1
            if name == "attn_mask" and t.ndim == 3:
                return 0, module.num_heads
            return None
        return batch, dim_of
    first = next(t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor))
    batch = first.shape[0]

    def dim_of(name: str, t: torch.Tensor) -> tuple[int, int] | None:
        return (0, 1) if t.ndim >= 1 and t.shape[0] == batch else None
    return batch, dim_of


def output_dims(module: nn.Module, outputs: list[torch.Tensor]) -> list[int]:
    """Batch dimension of each tensor output (MHA's attention output is seq-first unless
    ``batch_first``; its attention weights are batch-first)."""
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
        return [1 if i == 0 and t.ndim == 3 else 0 for i, t in enumerate(outputs)]
    return [0] * len(outputs)


def per_sample_grads(call: OwnerCall, params: list[nn.Parameter], n: int) -> list[torch.Tensor]:
    """``[(n, numel(W)) for W in params]``: sample i's gradient ``∂/∂W ⟨owner(x_i), δ_i⟩``.

    One forward and backward of the owner per sample, with gradients enabled, under a forked
    RNG (dropout inside the owner does not consume the training job's random stream).
    """
    devices = sorted({p.device.index for p in params if p.is_cuda})
    rows: list[list[torch.Tensor]] = [[] for _ in params]
    with torch.enable_grad(), torch.random.fork_rng(devices=devices):
        for i in range(n):
            out = call.module(*[s.sample(i) for s in call.args],
                              **{k: s.sample(i) for k, s in call.kwargs.items()})
            total = None
            for o, d, dim in zip(tensors_of(out), call.deltas, call.out_dims):
                if d is not None and o.requires_grad:
                    term = (o * d.narrow(dim, i, 1).to(o.dtype)).sum()
                    total = term if total is None else total + term
            if total is None:
                raise ValueError("NTK fallback: no output of the owner received a gradient")
            grads = torch.autograd.grad(total, params, allow_unused=True)
            for row, g, p in zip(rows, grads, params):
                row.append(torch.zeros(p.numel(), device=p.device) if g is None
                           else g.detach().reshape(-1).float())
    return [torch.stack(row) for row in rows]

