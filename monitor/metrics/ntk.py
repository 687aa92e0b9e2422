"""Per-layer cosine NTK: the Gram algebra (SPEC section 2). Pure functions of tensors; the
stateful capture (hooks, memory cap, fallback) is :mod:`monitor.metrics.ntk_capture`.

The PSS paper's "modified NTK" of a layer with weight W, over a probe of n samples:

    K_ij = ⟨g_i, g_j⟩ / (‖g_i‖ ‖g_j‖),      metric: λ_max(K) in [1, n]

with g_i the gradient of sample i's loss with respect to W. Loss scaling (mean reduction)
cancels in the cosine.

For the layers we support, each usage u of W gives a per-sample gradient that is a sum of
outer products, ``G^u_i = Σ_t r_{i,t} c_{i,t}ᵀ`` in W's own layout (d0, prod(rest)):

| module          | W         | row factor r           | column factor c          |
| --------------- | --------- | ---------------------- | ------------------------ |
| nn.Linear       | (out, in) | δ (output gradient)    | a (input)                |
| HF Conv1D       | (in, out) | a                      | δ                        |
| nn.Embedding    | (num, d)  | one-hot of the index   | δ                        |
| nn.Conv1d/2d/3d | (out, in·k) | δ at each position   | unfolded input patch     |

so ``⟨G^u_i, G^w_j⟩ = Σ_{t,s} (r^u_{i,t}·r^w_{j,s}) (c^u_{i,t}·c^w_{j,s})`` (the "T² trick")
needs only the inputs and output gradients, which forward hooks and tensor hooks on the
outputs capture during the training step's own forward and backward: no extra pass
(:mod:`monitor.metrics.ntk_capture`).
One-hot factors are kept as indices (equality and gathers, never a dense one-hot of the
vocabulary). A tied weight (GPT-2's ``wte`` embedding and ``lm_head``) has several usages;
its per-sample gradient is their sum, so the Gram includes every cross term. Per layer, the
cheaper of the T² trick and explicit per-sample gradients (n · numel(W) memory) is used;
grouped convolutions always use the explicit form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_KINDS = ("linear", "conv1d_hf", "conv", "embedding")
_CHUNK_ELEMENTS = 1 << 24  # bound on the (chunk, n, T_u, T_w) tensors of the T² trick


# ---------------------------------------------------------------------------------------
# Factors and usages: the pure part
# ---------------------------------------------------------------------------------------


@dataclass
class Dense:
    """A dense factor: one vector per sample and position, ``x`` of shape (n, T, d)."""

    x: torch.Tensor

    @property
    def dim(self) -> int:
        return self.x.shape[-1]


@dataclass
class Index:
    """A one-hot factor kept as indices: ``idx`` (n, T) into a dimension of size ``size``."""

    idx: torch.Tensor
    size: int

    @property
    def dim(self) -> int:
        return self.size


Factor = Union[Dense, Index]


@dataclass
class Outer:
    """A usage whose per-sample gradient is ``G_i = Σ_t row_{i,t} col_{i,t}ᵀ``."""

    row: Factor
    col: Factor

    @property
    def n(self) -> int:
        return _lead(self.row).shape[0]

    @property
    def T(self) -> int:
        return _lead(self.row).shape[1]

    def take(self, n: int) -> "Outer":
        return Outer(_take(self.row, n), _take(self.col, n))


@dataclass
class PerSample:
    """A usage given by explicit per-sample gradients ``g`` (n, numel(W))."""

    g: torch.Tensor

    @property
    def n(self) -> int:
        return self.g.shape[0]

    def take(self, n: int) -> "PerSample":
        return PerSample(self.g[:n])


Usage = Union[Outer, PerSample]


def _lead(f: Factor) -> torch.Tensor:
    return f.x if isinstance(f, Dense) else f.idx


def _take(f: Factor, n: int) -> Factor:
    return Dense(f.x[:n]) if isinstance(f, Dense) else Index(f.idx[:n], f.size)


def factor_pair(a: Factor, b: Factor) -> torch.Tensor:
    """Inner products ``P[i, j, t, s] = a_{i,t} · b_{j,s}``, shape (n_a, n_b, T_a, T_b)."""
    if a.dim != b.dim:
        raise ValueError(f"factor dimensions differ: {a.dim} and {b.dim}")
    if isinstance(a, Dense) and isinstance(b, Dense):
        return torch.einsum("itd,jsd->ijts", a.x, b.x)
    if isinstance(a, Index) and isinstance(b, Index):
        return (a.idx[:, None, :, None] == b.idx[None, :, None, :]).to(torch.float32)
    if isinstance(a, Index):  # e_{idx[i,t]} · b[j,s] = b[j, s, idx[i,t]]
        nb, Tb, d = b.x.shape
        picked = b.x.reshape(nb * Tb, d).index_select(1, a.idx.reshape(-1))
        return picked.reshape(nb, Tb, *a.idx.shape).permute(2, 0, 3, 1)
    return factor_pair(b, a).permute(1, 0, 3, 2)


def per_sample_gradients(u: Usage) -> torch.Tensor:
    """Explicit per-sample gradients (n, d_row · d_col) of a usage, in W's layout."""
    if isinstance(u, PerSample):
        return u.g
    row, col = u.row, u.col
    n, T = u.n, u.T
    if isinstance(row, Dense) and isinstance(col, Dense):
        return torch.einsum("ntr,ntc->nrc", row.x, col.x).reshape(n, -1)
    if isinstance(row, Index) and isinstance(col, Dense):
        out = col.x.new_zeros(n, row.size, col.dim)
        out.scatter_add_(1, row.idx[..., None].expand(n, T, col.dim), col.x)
        return out.reshape(n, -1)
    if isinstance(row, Dense) and isinstance(col, Index):
        out = row.x.new_zeros(n, row.dim, col.size)
        out.scatter_add_(2, col.idx[:, None, :].expand(n, row.dim, T), row.x.transpose(1, 2))
        return out.reshape(n, -1)
    flat = row.idx * col.size + col.idx  # (n, T): position of the one-hot product
    out = torch.zeros(n, row.size * col.size, device=flat.device)
    return out.scatter_add_(1, flat, torch.ones_like(flat, dtype=out.dtype))


def cross_gram(u: Outer, w: Outer) -> torch.Tensor:
    """``C_ij = ⟨G^u_i, G^w_j⟩`` by the T² trick, chunked over u's samples to bound memory."""
    n_u, n_w = u.n, w.n
    out = torch.empty(n_u, n_w, device=_lead(u.row).device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n_w * u.T * w.T))
    for i in range(0, n_u, chunk):
        part = Outer(_slice(u.row, i, i + chunk), _slice(u.col, i, i + chunk))
        out[i:i + chunk] = (factor_pair(part.row, w.row) * factor_pair(part.col, w.col)).sum((2, 3))
    return out


def _slice(f: Factor, i: int, j: int) -> Factor:
    return Dense(f.x[i:j]) if isinstance(f, Dense) else Index(f.idx[i:j], f.size)


def _pair_cost(a: Factor, b: Factor) -> int:
    """Flops per (i, j, t, s) entry of :func:`factor_pair`: a dot product, or one gather."""
    return a.dim if isinstance(a, Dense) and isinstance(b, Dense) else 1


def use_t2_trick(usages: list[Usage]) -> bool:
    """True when the T² trick costs fewer flops than explicit per-sample gradients."""
    if any(isinstance(u, PerSample) for u in usages):
        return False
    n = usages[0].n
    t2 = explicit = 0
    numel = usages[0].row.dim * usages[0].col.dim
    for u in usages:
        explicit += n * u.T * numel
        for w in usages:
            t2 += n * n * u.T * w.T * (_pair_cost(u.row, w.row) + _pair_cost(u.col, w.col))
    explicit += n * n * numel
    return t2 <= explicit


def gram_from_usages(usages: list[Usage]) -> torch.Tensor:
    """Gram ``⟨g_i, g_j⟩`` (n, n) of per-sample gradients ``g_i = Σ_u G^u_i``.

    All usages are truncated to the smallest sample count among them.
    """
    if not usages:
        raise ValueError("no usage of the layer to build a Gram matrix from")
    n = min(u.n for u in usages)
    usages = [u.take(n) for u in usages]
    if not use_t2_trick(usages):
        g = sum(per_sample_gradients(u) for u in usages)
        return g @ g.t()
    gram = torch.zeros(n, n, device=_lead(usages[0].row).device)
    for a, u in enumerate(usages):
        for w in usages[a:]:
            c = cross_gram(u, w)
            gram += c if w is u else c + c.t()
    return gram


def cosine_top_eig(gram: torch.Tensor) -> float:
    """``λ_max`` of the cosine kernel ``K_ij = G_ij / sqrt(G_ii G_jj)`` of a Gram matrix G.

    Samples with a zero gradient (``G_ii <= 1e-12 · max G_ii``) are dropped; with fewer than
    two left, or non-finite entries, raises ValueError. The value lies in [1, samples kept].
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"cosine_top_eig: expected a square matrix, got {tuple(gram.shape)}")
    g = gram.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(g).all()):
        raise ValueError("NTK undefined: the Gram matrix has non-finite entries")
    d = g.diagonal()
    top = float(d.max()) if d.numel() else 0.0
    keep = d > 1e-12 * top if top > 0 else torch.zeros_like(d, dtype=torch.bool)
    kept = int(keep.sum())
    if kept < 2:
        raise ValueError(f"NTK undefined: {kept} of {g.shape[0]} probe samples have a nonzero "
                         "gradient (need at least 2)")
    inv = d[keep].rsqrt()
    K = g[keep][:, keep] * inv[:, None] * inv[None, :]
    return float(torch.linalg.eigvalsh(K)[-1])


# ---------------------------------------------------------------------------------------
# From captured inputs and output gradients to usages
# ---------------------------------------------------------------------------------------


def conv_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Unfolded input patches (n, L, C · prod(k)) of a Conv1d/2d/3d, in the weight's order."""
    d = x.ndim - 2
    k, stride, dil = module.kernel_size, module.stride, module.dilation
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
    else:
        pad = module.padding
        if pad == "valid":
            pad = (0,) * d
        if pad == "same":
            totals = [dil[i] * (k[i] - 1) for i in range(d)]
            pairs = [(t // 2, t - t // 2) for t in totals]
        else:
            pairs = [(p, p) for p in pad]
        x = F.pad(x, [v for pair in reversed(pairs) for v in pair])
    for i in range(d):
        x = x.unfold(2 + i, dil[i] * (k[i] - 1) + 1, stride[i])  # window appended last
        if dil[i] > 1:
            x = x[..., :: dil[i]]
    n, C = x.shape[:2]
    L = math.prod(x.shape[2:2 + d])
    x = x.permute(0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))  # (n, L..., C, k...)
    return x.reshape(n, L, C * math.prod(k))


def usage_from_capture(kind: str, module: nn.Module, a: torch.Tensor,
                       delta: torch.Tensor) -> Usage:
    """The usage of ``module.weight`` given its input ``a`` and output gradient ``delta``."""
    n = min(a.shape[0], delta.shape[0])
    a, delta = a[:n], delta[:n].to(torch.float32)
    if kind in ("linear", "conv1d_hf"):
        a = a.to(torch.float32).reshape(n, -1, a.shape[-1])  # (n, T, in)
        delta = delta.reshape(n, -1, delta.shape[-1])  # (n, T, out)
        if kind == "linear":
            return Outer(Dense(delta), Dense(a))
        return Outer(Dense(a), Dense(delta))
    if kind == "embedding":
        if module.scale_grad_by_freq:
            raise ValueError("NTK: nn.Embedding(scale_grad_by_freq=True) is not supported")
        idx = a.reshape(n, -1).long()  # (n, T)
        delta = delta.reshape(n, idx.shape[1], -1)  # (n, T, dim)
        if module.padding_idx is not None:  # the padding row receives no gradient
            delta = delta * (idx != module.padding_idx)[..., None]
        return Outer(Index(idx, module.num_embeddings), Dense(delta))
    if kind == "conv":
        patches = conv_patches(module, a.to(torch.float32))  # (n, L, C·k)
        delta = delta.flatten(2).transpose(1, 2)  # (n, out, L...) -> (n, L, out)
        if patches.shape[1] != delta.shape[1]:
            raise ValueError(f"NTK: conv patches give {patches.shape[1]} positions, the output "
                             f"{delta.shape[1]}")
        g = module.groups
        if g == 1:
            return Outer(Dense(delta), Dense(patches))
        L = delta.shape[1]
        grads = torch.einsum("nlgo,nlgc->ngoc", delta.reshape(n, L, g, -1),
                             patches.reshape(n, L, g, -1))  # (n, g, out/g, C/g·k)
        return PerSample(grads.reshape(n, -1))
    raise ValueError(f"NTK: no support for layer kind {kind!r}")
