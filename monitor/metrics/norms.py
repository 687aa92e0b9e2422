"""Gradient and parameter norms, health counts, update ratio (SPEC section 2).

All functions take a list of tensors and reduce it with one fused ``torch._foreach_norm``
call per dtype family (float32 accumulation for float32 and narrower, float64 for float64),
then move the results to the host in one transfer per device: no per-tensor ``.item()``.
A sparse gradient (``nn.Embedding(sparse=True)``) counts through the values of its
coalesced form, which hold every non-zero entry once, so norms and counts equal the dense
tensor's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch


def dense_values(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or for a sparse tensor its stored values (duplicates of a COO tensor
    summed first): the same Frobenius norm and the same non-finite entries as the dense
    tensor, without densifying it."""
    t = t.detach()
    if t.layout == torch.strided:
        return t
    if t.layout == torch.sparse_coo:
        return t.coalesce().values()
    return t.values()  # compressed layouts (CSR, CSC, BSR, BSC) store each entry once


def _norm_tensors(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor Frobenius norms as 0-d tensors, float32 (float64 for float64 tensors, which
    ``_foreach_norm`` refuses to narrow); one fused call per dtype family and device."""
    flat = [dense_values(t) for t in tensors]
    wide = [i for i, t in enumerate(flat) if t.dtype == torch.float64]
    if not wide:
        return list(torch._foreach_norm(flat, 2, dtype=torch.float32))
    out: list[torch.Tensor] = [torch.empty(0)] * len(flat)
    narrow = [i for i in range(len(flat)) if flat[i].dtype != torch.float64]
    for idx, dtype in ((wide, torch.float64), (narrow, torch.float32)):
        if idx:
            for i, n in zip(idx, torch._foreach_norm([flat[i] for i in idx], 2, dtype=dtype)):
                out[i] = n
    return out


def _to_floats(values: Sequence[torch.Tensor]) -> list[float]:
    """One host transfer per device for a list of 0-d tensors, order kept."""
    out: list[float] = [0.0] * len(values)
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        by_device.setdefault(v.device, []).append(i)
    for idx in by_device.values():
        host = torch.stack([values[i] for i in idx]).cpu().tolist()  # float64 if any is
        for i, x in zip(idx, host):
            out[i] = float(x)
    return out


def tensor_norms(tensors: Sequence[torch.Tensor]) -> list[float]:
    """``[‖T‖_F for T in tensors]`` (float32 accumulation; inf/nan propagate)."""
    if not tensors:
        return []
    return _to_floats(_norm_tensors(tensors))


def global_norm(norms: Iterable[float]) -> float:
    """``sqrt(Σ n²)`` of per-tensor norms: the global norm over all of them."""
    values = list(norms)
    return math.hypot(*values) if values else 0.0


def global_grad_norm(grads: Sequence[torch.Tensor]) -> float:
    """Global norm ``sqrt(Σ_l ‖G_l‖_F²)`` of a list of tensors with a single host transfer."""
    if not grads:
        return 0.0
    norms = _norm_tensors(grads)
    device = norms[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
    return float(total.item())


def nonfinite_count(tensors: Sequence[torch.Tensor]) -> int:
    """Total number of non-finite (inf or nan) entries over ``tensors``.

    A fused norm screens the list (a non-finite entry always makes the norm non-finite; a
    finite overflow only costs an exact count); only the flagged tensors are counted entry
    by entry, so the common all-finite case costs one fused reduction and one transfer.
    """
    if not tensors:
        return 0
    norms = tensor_norms(tensors)
    count = 0
    for t, n in zip(tensors, norms):
        if not math.isfinite(n):
            count += int((~torch.isfinite(dense_values(t))).sum().item())
    return count


def update_ratio(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> list[float]:
    """``‖W_after - W_before‖_F / ‖W_before‖_F`` per tensor (nan where ‖W_before‖ = 0)."""
    _check_lengths(before=before, after=after)
    if not before:
        return []
    deltas = [a.detach().float() - b.detach().float() for a, b in zip(after, before)]
    values = _to_floats(_norm_tensors(deltas) + _norm_tensors(before))
    d, w = values[: len(before)], values[len(before):]
    return [di / wi if wi > 0 else math.nan for di, wi in zip(d, w)]


def lr_effective(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor],
                 grads: Sequence[torch.Tensor]) -> list[float]:
    """Measured rate ``‖W_after - W_before‖_F / ‖G‖_F`` per tensor (nan where ‖G‖ = 0)."""
    _check_lengths(before=before, after=after, grads=grads)
    if not before:
        return []
    deltas = [a.detach().float() - b.detach().float() for a, b in zip(after, before)]
    values = _to_floats(_norm_tensors(deltas) + _norm_tensors(grads))
    d, g = values[: len(before)], values[len(before):]
    return [di / gi if gi > 0 else math.nan for di, gi in zip(d, g)]


def _check_lengths(**lists: Sequence[torch.Tensor]) -> None:
    lengths = {name: len(v) for name, v in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"tensor lists must have the same length, got {lengths}")
