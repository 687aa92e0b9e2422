"""Per-layer cosine NTK top eigenvalue from hooks on the ordinary backward (SPEC section 2).

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
outputs capture during the training step's own forward and backward: no extra pass.
One-hot factors are kept as indices (equality and gathers, never a dense one-hot of the
vocabulary). A tied weight (GPT-2's ``wte`` embedding and ``lm_head``) has several usages;
its per-sample gradient is their sum, so the Gram includes every cross term. Per layer, the
cheaper of the T² trick and explicit per-sample gradients (n · numel(W) memory) is used;
grouped convolutions always use the explicit form.

Assumptions (documented limits): the batch is dimension 0 of every input and output, of the
size seen by the first watched module called in the step (an embedding called on indices of
leading size 1 does not count). An embedding called on indices
shared by the batch (position embeddings of ``arange(T)`` or of a (1, T) buffer) is supported
when its output is added to a batch-shaped tensor (the gradient of the sum is captured, see
``_resolve_broadcast``); other calls with another leading size have no separable per-sample
gradient and are reported as failed for their layer; sample
i of every call of a module during the captured forward is the same sample; only the first
forward and backward after :meth:`NTKCapture.arm` are captured (gradient accumulation), and
forwards without autograd (``no_grad``, evaluation) are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from monitor.metrics.views import module_kind

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


# ---------------------------------------------------------------------------------------
# The capture
# ---------------------------------------------------------------------------------------


@dataclass
class _Capture:
    """One call of a watched module during the captured forward."""

    kind: str
    module: nn.Module
    a: torch.Tensor
    batch: int  # size of dimension 0 of the full input (before keeping n samples)
    delta: torch.Tensor | None = None
    broadcast_node: Any = None  # grad_fn of an embedding output shared by the batch
    broadcast_shape: tuple[int, ...] = ()  # that output's shape


def _shared_input(c: _Capture) -> torch.Tensor:
    """The input of a call, repeated for every probe sample when the batch shared it."""
    if c.broadcast_node is None:
        return c.a
    a = c.a[0] if c.broadcast_shape[:1] == (1,) else c.a  # (1, T) or (T,) -> (T,)
    return a.reshape(1, -1).expand(c.delta.shape[0], -1)


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor"


class NoGradient(LookupError):
    """No gradient reached the layer during the captured step (unused or detached)."""


class Unsupported(ValueError):
    """The layer's use makes its per-sample gradients unrecoverable from hooks (structural:
    it will not change from step to step)."""


class NTKCapture:
    """Captures inputs and output gradients of the watched weights' modules for one step.

    Args:
        model: the model.
        param_names: ``{id(parameter): name}`` of the weights to watch.
        n: probe size; only the first ``n`` samples of the batch are kept (detached copies).
        max_bytes: cap on what one step's captures may hold (inputs and output gradients of
            the probe samples); a layer whose capture would pass it is skipped, reported once
            as unsupported with the reason. None: no cap.

    Usage: ``arm()`` before a training step's forward; after its ``loss.backward()``,
    ``compute()`` returns ``({name: λ_max}, {name: reason})``; then ``disarm()``. Hooks never
    raise: a capture that fails is reported by ``compute()`` for that layer.
    """

    def __init__(self, model: nn.Module, param_names: Mapping[int, str], n: int = 16,
                 max_bytes: int | None = None) -> None:
        if not isinstance(n, int) or n < 2:
            raise ValueError(f"NTKCapture(n={n!r}): the probe needs at least 2 samples")
        self.model, self.n, self.max_bytes = model, n, max_bytes
        self._bytes = 0  # held by this step's captures
        self.names = dict(param_names)
        self._modules: list[tuple[nn.Module, str, str]] = []  # (module, kind, weight name)
        self._params = {id(p): p for p in model.parameters() if id(p) in self.names}
        inside_mha = {id(m) for mha in model.modules() if isinstance(mha, nn.MultiheadAttention)
                      for m in mha.modules()}  # MHA uses its out_proj weight functionally
        found: set[int] = set()
        for module in model.modules():
            if id(module) in inside_mha:
                continue
            weight = module._parameters.get("weight")
            if weight is None or id(weight) not in self.names:
                continue
            kind = module_kind(module)
            if kind in SUPPORTED_KINDS:
                self._modules.append((module, kind, self.names[id(weight)]))
                found.add(id(weight))
        self.unsupported = {name: "NTK not supported for this layer (only weights of Linear, "
                            "HF Conv1D, Conv1d/2d/3d and Embedding modules)"
                            for pid, name in self.names.items() if pid not in found}
        self._handles: list[Any] = []
        self._captures: dict[str, list[_Capture]] = {}
        self._errors: dict[str, str] = {}
        self._armed = False
        self._generation = 0
        self._backward_started = False
        self._batch: int | None = None  # leading size of the first watched call of the step
        self._broadcast: list[tuple[_Capture, str]] = []  # shared embeddings to resolve

    @property
    def armed(self) -> bool:
        return self._armed

    def arm(self) -> None:
        """Start capturing the next forward and backward (drops anything captured before)."""
        self.disarm()
        self._generation += 1
        self._armed = True
        gen = self._generation
        for module, kind, name in self._modules:
            hook = partial(self._on_forward, kind=kind, name=name, gen=gen)
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def disarm(self) -> None:
        """Remove all hooks and free what was captured. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._armed = False
        self._generation += 1  # tensor hooks still pending in old graphs become no-ops
        self._captures, self._errors, self._broadcast = {}, {}, []
        self._backward_started, self._batch, self._bytes = False, None, 0

    def _keep(self, t: torch.Tensor, name: str) -> torch.Tensor | None:
        """A detached copy of ``t``'s first n samples, or None (and the layer skipped from
        now on) when it would take this step's captures past ``max_bytes``."""
        part = t[: self.n]
        size = part.numel() * part.element_size()
        if self.max_bytes is not None and self._bytes + size > self.max_bytes:
            self.unsupported[name] = (
                f"NTK skipped: its probe capture would take the step's captures past "
                f"ntk_max_mb={self.max_bytes / 2**20:g} MB (about n * T * (d_in + d_out) values "
                "per layer); raise ntk_max_mb, lower ntk_probe or narrow `layers`")
            for record in self._captures.pop(name, []):  # free what it holds already
                for held in (record.a, record.delta):
                    if held is not None:
                        self._bytes -= held.numel() * held.element_size()
            return None
        self._bytes += size
        return part.detach().clone()

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any, *,
                    kind: str, name: str, gen: int) -> None:
        try:
            if gen != self._generation or self._backward_started or name in self.unsupported:
                return  # a later micro-batch, a recomputation during backward, a skipped layer
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor)
                    and output.requires_grad):
                return  # evaluation or frozen path: not part of the training gradient
            x = args[0] if args else next(iter(kwargs.values()))
            if _is_dtensor(x) or _is_dtensor(output):
                self.unsupported[name] = ("NTK of a tensor-parallel layer (DTensor activations) "
                                          "is not supported")
                return
            shared = kind == "embedding" and (
                x.shape[0] == 1 if self._batch is None else x.shape[0] != self._batch)
            if self._batch is None and not shared:
                self._batch = x.shape[0]  # the first watched call of the step sets the batch
            if self._broadcast:
                self._resolve_broadcast(x, gen)
            kept = self._keep(x, name)
            if kept is None:
                return
            record = _Capture(kind, module, kept, x.shape[0])
            self._captures.setdefault(name, []).append(record)
            if shared:
                record.broadcast_node = output.grad_fn  # e.g. wpe(arange(T)): see below
                record.broadcast_shape = tuple(output.shape)
                self._broadcast.append((record, name))
            else:
                output.register_hook(partial(self._on_grad, record=record, gen=gen, name=name))
        except Exception as err:  # never break training
            self._errors[name] = f"NTK capture failed in forward: {err!r}"

    def _resolve_broadcast(self, x: torch.Tensor, gen: int) -> None:
        """Find where a batch-shared embedding output is added to a batch-shaped tensor.

        ``h = wte(idx) + wpe(arange(T))``: the output gradient of ``wpe`` is summed over the
        batch, but the gradient of ``h`` (the add's output) holds each sample's share, and
        the add passes it unchanged. A later watched module's input leads back to that add
        in the autograd graph; a pre-hook on the add node captures the gradient of ``h``.
        """
        targets = {id(rec.broadcast_node): (rec, name) for rec, name in self._broadcast}
        start = x.grad_fn
        seen, queue = set(), [start] if start is not None else []
        while queue and len(seen) < 256:
            node = queue.pop(0)
            if id(node) in seen:
                continue
            seen.add(id(node))
            for child, _ in node.next_functions:
                if child is None:
                    continue
                if id(child) in targets and type(node).__name__ == "AddBackward0":
                    rec, name = targets.pop(id(child))
                    self._broadcast = [(r, n) for r, n in self._broadcast if r is not rec]
                    node.register_prehook(partial(self._on_shared_grad, record=rec, gen=gen,
                                                  name=name))
                    if not targets:
                        return
                queue.append(child)

    def _on_shared_grad(self, grad_outputs: tuple, *, record: _Capture, gen: int,
                        name: str) -> None:
        try:
            if gen != self._generation or record.delta is not None:
                return
            self._backward_started = True
            g = grad_outputs[0]
            shared = record.broadcast_shape[1:] if record.broadcast_shape[:1] == (1,) \
                else record.broadcast_shape
            if g is None or g.shape[0] != self._batch or tuple(g.shape[1:]) != shared:
                return
            if name not in self.unsupported:
                record.delta = self._keep(g, name)
        except Exception as err:
            self._errors[name] = f"NTK capture failed in backward: {err!r}"

    def _on_grad(self, grad: torch.Tensor, *, record: _Capture, gen: int, name: str) -> None:
        try:
            if gen != self._generation:
                return
            self._backward_started = True
            if record.delta is None and name not in self.unsupported:  # (a second backward
                record.delta = self._keep(grad, name)  # through a retained graph: ignored)
        except Exception as err:
            self._errors[name] = f"NTK capture failed in backward: {err!r}"

    def gram(self, name: str) -> torch.Tensor:
        """Gram matrix ``⟨g_i, g_j⟩`` (n, n) of the per-sample gradients of weight ``name``.

        Raises NoGradient when no captured call of the layer received a gradient.
        """
        if name in self._errors:
            raise ValueError(self._errors[name])
        for c in self._captures.get(name, []):
            if c.broadcast_node is not None and c.delta is None:
                raise Unsupported(
                    f"NTK: {name} was called on indices shared by the whole batch and its output "
                    "is not added directly to a batch-shaped tensor: per-sample gradients cannot "
                    "be separated from its output gradient")
        calls = [c for c in self._captures.get(name, []) if c.delta is not None]
        if not calls:
            raise NoGradient(f"no gradient reached {name} during the captured step")
        for c in calls:
            if c.broadcast_node is not None:
                continue
            if c.batch != self._batch or c.delta.shape[0] != min(c.batch, self.n):
                raise Unsupported(
                    f"NTK: {name} was called on an input of shape {tuple(c.a.shape[1:])} with "
                    f"leading size {c.batch}, not the batch size {self._batch} (an input shared "
                    "by the whole batch, such as position embeddings of arange(T)): per-sample "
                    "gradients cannot be separated from its output gradient")
        usages = [usage_from_capture(c.kind, c.module, _shared_input(c), c.delta) for c in calls]
        with torch.no_grad():
            return gram_from_usages(usages)

    def compute(self) -> tuple[dict[str, float], dict[str, str]]:
        """``({name: λ_max of the cosine kernel}, {name: why it failed})`` for this step.

        Layers that were not used, or that received no gradient, are in neither dict.
        """
        values: dict[str, float] = {}
        errors: dict[str, str] = dict(self.unsupported)
        if self.armed and not self._captures and not self._errors:
            reason = ("NTK: no forward pass of a watched module ran between arm() and compute() "
                      "(with optimizer.step(closure), the closure runs after the step pre-hook)")
            errors.update({name: reason for name in self.names.values() if name not in errors
                           and self._has_gradient(name)})
            return values, errors
        for name in self.names.values():
            if name in errors:
                continue
            try:
                values[name] = cosine_top_eig(self.gram(name))
            except Unsupported as err:
                self.unsupported[name] = str(err)  # structural: reported, then skipped
                errors[name] = str(err)
            except NoGradient:
                if self.armed and name not in self._captures and self._has_gradient(name):
                    errors[name] = ("NTK: the weight has a gradient but its module's forward was "
                                    "not called (weight used functionally?)")
                continue
            except Exception as err:
                errors[name] = str(err)
        return values, errors

    def _has_gradient(self, name: str) -> bool:
        """Whether the watched weight ``name`` holds a nonzero gradient (rare path: one sync)."""
        for pid, pname in self.names.items():
            param = self._params.get(pid)
            if pname == name and param is not None and param.grad is not None:
                grad = param.grad.detach()
                grad = grad.to_local() if hasattr(grad, "to_local") else grad  # a DTensor's shard
                return grad.numel() == 0 or bool(grad.abs().max() > 0)
        return False
