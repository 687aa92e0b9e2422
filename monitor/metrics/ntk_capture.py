"""The stateful half of the per-layer NTK: hooks on the training step's own forward and
backward that capture inputs and output gradients, a memory cap, and a per-sample fallback
for weights used functionally (SPEC section 2). The Gram algebra is :mod:`monitor.metrics.ntk`.

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

Fallback for weights used functionally. ``nn.MultiheadAttention`` passes ``in_proj_weight``
(or ``q/k/v_proj_weight``) and ``out_proj.weight`` to ``F.multi_head_attention_forward``
instead of calling a module with them, and a raw ``nn.Parameter`` of a custom module is used
the same way: no module hook sees those products. For such a weight the capture takes the
inputs and output gradients of its *owner* module (the MHA, the custom module; for a Linear
whose own forward never ran, its parent, learned at the first NTK step that shows it), and
after the backward re-runs the owner once per probe sample: sample i's gradient is
``∂/∂W ⟨owner(x_i), δ_i⟩`` (a vector-Jacobian product), exactly the gradient of the training
loss through that module. Cost: n forwards and backwards of the owner on one sample (about
what ``torch.func`` per-sample gradients of the owner cost) and n · numel(W) memory per
weight. Limits: the owner's output for sample i must depend on sample i only (no batch
norm inside it); dropout inside it draws new masks in the re-run (under a forked RNG, so the
training stream is untouched), so the value is exact only without dropout; hooks of other
libraries on the owner also fire during the re-run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from monitor.metrics.ntk import (SUPPORTED_KINDS, PerSample, cosine_top_eig, gram_from_usages,
                                 usage_from_capture)
from monitor.metrics.ntk_fallback import (OwnerCall, Slot, batch_layout, output_dims,
                                          per_sample_grads, tensors_of)
from monitor.metrics.views import module_kind


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
        self._parents = {id(child): module for module in model.modules()
                         for child in module.children()}
        # fallback owners: id(owner) -> (owner, names of the watched weights it re-runs for)
        self._owners: dict[int, tuple[nn.Module, list[str]]] = {}
        inside_mha = set()
        for mha in model.modules():
            if isinstance(mha, nn.MultiheadAttention):  # uses its weights functionally
                inside_mha.update(id(m) for m in mha.modules())
                for p in mha.parameters():
                    self._add_owner(mha, p)
        found: set[int] = set()
        for module in model.modules():
            weight = module._parameters.get("weight")
            if id(module) in inside_mha or weight is None or id(weight) not in self.names:
                continue
            kind = module_kind(module)
            if kind in SUPPORTED_KINDS:  # every such module: a tied weight has several usages
                self._modules.append((module, kind, self.names[id(weight)]))
                found.add(id(weight))
        for module in model.modules():  # raw parameters of custom modules
            for p in module._parameters.values():
                if p is not None and id(p) not in found and id(module) not in inside_mha:
                    self._add_owner(module, p)
        owned = {name for _, names in self._owners.values() for name in names}
        self.unsupported = {name: "NTK not supported for this weight (no module owns it)"
                            for pid, name in self.names.items()
                            if pid not in found and name not in owned}
        self._owner_calls: dict[int, list[OwnerCall]] = {}
        self._owner_grads: dict[int, dict[str, list[PerSample]]] = {}  # this step's re-runs
        self._by_name = {name: self._params[pid] for pid, name in self.names.items()
                         if pid in self._params}
        self._rerunning = False  # the fallback re-runs owners: our hooks must stay quiet
        self._model_ran = False  # the model's own forward ran since arm()
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

    @property
    def probe_used(self) -> int:
        """Samples the probe holds this step: ``min(n, batch size)`` (0 before a capture)."""
        return min(self.n, self._batch) if self._batch else 0

    def _add_owner(self, owner: nn.Module, p: torch.Tensor) -> None:
        """Compute the watched weight ``p`` by re-running ``owner`` per sample (fallback)."""
        name = self.names.get(id(p))
        if name is None or any(name in names for _, names in self._owners.values()):
            return
        self._owners.setdefault(id(owner), (owner, []))[1].append(name)

    def arm(self) -> None:
        """Start capturing the next forward and backward (drops anything captured before)."""
        self.disarm()
        self._generation += 1
        self._armed = True
        gen = self._generation
        for module, kind, name in self._modules:
            hook = partial(self._on_forward, kind=kind, name=name, gen=gen)
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
        for owner, _ in self._owners.values():
            hook = partial(self._on_owner_forward, gen=gen)
            self._handles.append(owner.register_forward_hook(hook, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(partial(self._on_model_forward,
                                                                      gen=gen)))

    def disarm(self) -> None:
        """Remove all hooks and free what was captured. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._armed = False
        self._generation += 1  # tensor hooks still pending in old graphs become no-ops
        self._captures, self._errors, self._broadcast = {}, {}, []
        self._owner_calls, self._owner_grads = {}, {}
        self._model_ran = False  # the model's own forward ran since arm()
        self._backward_started, self._batch, self._bytes = False, None, 0

    def _keep(self, t: torch.Tensor, name: str) -> torch.Tensor | None:
        """A detached copy of ``t``'s first n samples, or None (and the layer skipped from
        now on) when it would take this step's captures past ``max_bytes``."""
        part = t[: self.n]
        return part.detach().clone() if self._account(part, name) else None

    def _account(self, part: torch.Tensor, name: str) -> bool:
        """Count ``part`` against ``max_bytes``; False (and the layer skipped from now on)
        when it would take this step's captures past the cap."""
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
            return False
        self._bytes += size
        return True

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any, *,
                    kind: str, name: str, gen: int) -> None:
        try:
            if (gen != self._generation or self._backward_started or self._rerunning
                    or name in self.unsupported):
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

    def _on_model_forward(self, module: nn.Module, args: tuple, output: Any, *, gen: int) -> None:
        if gen == self._generation and not self._rerunning:
            self._model_ran = True

    def _on_owner_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any, *,
                          gen: int) -> None:
        """Keep the probe part of a fallback owner's inputs; hook its outputs' gradients."""
        names = self._owners[id(module)][1]
        try:
            if gen != self._generation or self._backward_started or self._rerunning:
                return
            outputs = tensors_of(output)
            if not (torch.is_grad_enabled() and any(o.requires_grad for o in outputs)):
                return
            batch, dim_of = batch_layout(module, args, kwargs)
            if self._batch is None:
                self._batch = batch
            n = min(self.n, batch)

            def slot(key: str, value: Any) -> Slot:
                layout = dim_of(key, value) if isinstance(value, torch.Tensor) else None
                if layout is None:
                    return Slot(value)
                dim, rows = layout
                part = value.narrow(dim, 0, n * rows)
                return Slot(part.detach().clone() if self._account(part, names[0]) else None,
                            dim, rows)

            call = OwnerCall(module, [slot(str(i), a) for i, a in enumerate(args)],
                             {k: slot(k, v) for k, v in kwargs.items()}, batch,
                             output_dims(module, outputs), [None] * len(outputs))
            if any(s.dim is not None and s.value is None for s in call.args + list(call.kwargs.values())):
                for name in names[1:]:  # over the memory cap: every weight of the owner
                    self.unsupported[name] = self.unsupported[names[0]]
                return
            self._owner_calls.setdefault(id(module), []).append(call)
            for i, (o, dim) in enumerate(zip(outputs, call.out_dims)):
                if o.requires_grad and o.ndim > dim and o.shape[dim] == batch:  # not a loss
                    o.register_hook(partial(self._on_owner_grad, call=call, index=i, gen=gen))
        except Exception as err:  # never break training
            for name in names:
                self._errors[name] = f"NTK capture failed in forward: {err!r}"

    def _on_owner_grad(self, grad: torch.Tensor, *, call: OwnerCall, index: int,
                       gen: int) -> None:
        try:
            if gen != self._generation or call.deltas[index] is not None:
                return
            self._backward_started = True
            dim = call.out_dims[index]
            call.deltas[index] = grad.narrow(dim, 0, min(self.n, call.batch)).detach().clone()
        except Exception as err:  # never break training
            for name in self._owners[id(call.module)][1]:
                self._errors[name] = f"NTK capture failed in backward: {err!r}"

    def _fallback_usages(self, name: str) -> list[PerSample]:
        """Per-sample gradients of ``name`` from each call of its owner: one re-run of the
        owner per step serves all the weights it owns (cached until ``disarm``)."""
        owner_id = next(i for i, (_, names) in self._owners.items() if name in names)
        if owner_id not in self._owner_grads:
            names = [nm for nm in self._owners[owner_id][1] if nm not in self.unsupported]
            calls = [c for c in self._owner_calls.get(owner_id, [])
                     if any(d is not None for d in c.deltas)]
            params = [self._by_name[nm] for nm in names]
            grads: dict[str, list[PerSample]] = {nm: [] for nm in names}
            if calls:
                n = min(min(self.n, c.batch) for c in calls)
                size = n * sum(p.numel() for p in params) * 4 * len(calls)
                if self.max_bytes is not None and size > self.max_bytes:
                    raise Unsupported(f"NTK skipped: per-sample gradients of the weights of "
                                      f"{type(self._owners[owner_id][0]).__name__} ({size / 2**20:.0f}"
                                      f" MB) would pass ntk_max_mb")
                self._rerunning = True
                try:
                    for c in calls:
                        for nm, g in zip(names, per_sample_grads(c, params, n)):
                            grads[nm].append(PerSample(g))
                finally:
                    self._rerunning = False
            self._owner_grads[owner_id] = grads
        usages = self._owner_grads[owner_id].get(name, [])
        if not usages:
            raise NoGradient(f"no gradient reached {name} during the captured step")
        return usages

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
        if any(name in names for _, names in self._owners.values()):
            with torch.no_grad():
                return gram_from_usages(self._fallback_usages(name))
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
        if self.armed and not self._captures and not self._errors and not self._owner_calls:
            reason = ("NTK: no forward pass of a watched module ran between arm() and compute() "
                      "(with optimizer.step(closure), the closure runs after the step pre-hook)")
            for name in self.names.values():
                if name not in errors and self._has_gradient(name):
                    functional = self._model_ran and any(nm == name for _, _, nm in self._modules)
                    errors[name] = self._learn_owner(name) if functional else reason
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
                    errors[name] = self._learn_owner(name)
                continue
            except Exception as err:
                errors[name] = str(err)
        return values, errors

    def _learn_owner(self, name: str) -> str:
        """A weight with a gradient whose module's forward never ran is used functionally by
        a parent: from the next NTK step, re-run that parent per sample (the fallback)."""
        for i, (module, _kind, nm) in enumerate(self._modules):
            if nm == name:
                parent = self._parents.get(id(module))
                if parent is None:
                    break
                del self._modules[i]
                self._add_owner(parent, self._by_name[name])
                return (f"NTK: the weight has a gradient but its module's forward was not called "
                        f"(used functionally): from the next NTK step on, per-sample gradients "
                        f"come from re-running its parent {type(parent).__name__} on each sample")
        return ("NTK: the weight has a gradient but no watched call of its owner received one "
                "(used functionally outside its owner?)")

    def _has_gradient(self, name: str) -> bool:
        """Whether the watched weight ``name`` holds a nonzero gradient (rare path: one sync)."""
        for pid, pname in self.names.items():
            param = self._params.get(pid)
            if pname == name and param is not None and param.grad is not None:
                grad = param.grad.detach()
                grad = grad.to_local() if hasattr(grad, "to_local") else grad  # a DTensor's shard
                return grad.numel() == 0 or bool(grad.abs().max() > 0)
        return False
