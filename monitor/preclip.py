"""Gradient norms before the user's clipping (SPEC section 3, "Detection"; issue 11).

The optimizer's step pre-hook sees the gradients the optimizer will apply: after
``clip_grad_norm_`` (or value clipping, AGC, ...) has run. A spike is then invisible to
PSS's detection, which compares the norm with its running average: clipped to 1.0, a
100x spike reads as a norm of 1.0. So the monitor taps each gradient where autograd
finishes writing it, before any user code can touch it:

``Tensor.register_post_accumulate_grad_hook`` runs after a backward pass has accumulated
into ``param.grad``. The hook stores ``‖param.grad‖_F`` as a 0-d tensor on the gradient's
device (no host synchronisation); with gradient accumulation the last backward before
the step overwrites the earlier ones, so what is read at the step is the norm of the final
accumulated gradient. :meth:`PreClipNorms.take` returns the stored norms of the step and
forgets them, in one host transfer per device.

Cost: one norm kernel per parameter per backward pass (a read of the gradient, small
beside the backward that wrote it), and one Python call per parameter per backward pass
also when the norms are not wanted (the hook returns at once). Measured
(``benchmarks/bench_preclip.py``, ``results/preclip.md``): below the noise, 0.97-1.00x the
CPU time of a training step of a small GPT with clipping (28 tensors). It cannot be fused
over parameters: each gradient is final only at its own hook, and a fused norm at the step
would need a copy of every gradient made before the user's clipping.

Limits, stated: under fp16 loss scaling (``torch.amp.GradScaler``) the accumulated
gradient is the *scaled* one, so the pre-clip norms carry the loss scale (the detection
ratio is unaffected while the scale stays constant; ``train/grad_norm`` is off by it). In
a ``torch.distributed`` job the hook sees the local gradient before the all-reduce, so the
monitor does not tap there (the ranks' norms would disagree).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence

import torch

from monitor import schema
from monitor.metrics import norms


class PreClipNorms:
    """Per-parameter gradient norms as accumulated by autograd, before any clipping.

    Args:
        params: the tensors to tap (those without ``requires_grad`` are skipped).
        wanted: called with no argument in the hook; False skips the norm (steps that
            neither log nor run PSS pay only the Python call).
    """

    def __init__(self, params: Sequence[torch.Tensor], wanted: Callable[[], bool],
                 spent: Callable[[float], None] | None = None) -> None:
        self._wanted, self._spent = wanted, spent
        self._norms: dict[int, torch.Tensor] = {}
        self._handles = [p.register_post_accumulate_grad_hook(self._record)
                         for p in params if p.requires_grad]

    def _record(self, param: torch.Tensor) -> None:
        if param.grad is not None and self._wanted():
            start = time.perf_counter()
            g = norms.dense_values(param.grad)  # detached; a sparse gradient's stored values
            wide = torch.float64 if g.dtype == torch.float64 else torch.float32
            self._norms[id(param)] = torch.linalg.vector_norm(g, dtype=wide)
            if self._spent is not None:  # the monitor's own time (monitor/seconds)
                self._spent(time.perf_counter() - start)

    def take(self, params: Sequence[torch.Tensor]) -> list[float | None]:
        """The norms recorded for ``params`` since the last call (None: not recorded)."""
        found = [(i, self._norms[id(p)]) for i, p in enumerate(params) if id(p) in self._norms]
        self._norms.clear()
        out: list[float | None] = [None] * len(params)
        for (i, _), value in zip(found, norms._to_floats([v for _, v in found])):
            out[i] = value
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._norms.clear()


# ---------------------------------------------------------------- what the hook calls
def make_tap(mon) -> PreClipNorms | None:
    """The tap of a :class:`monitor.hook.Monitor`: norms are taken on the steps it logs or,
    with PSS or alerts on, on every step. None in a distributed job (see the module docstring)."""
    from monitor.integrations.distributed import rank_and_world_size

    if rank_and_world_size()[1] > 1:
        return None
    def spent(seconds: float) -> None:
        mon._busy += seconds

    return PreClipNorms([l.param for l in mon.layers],
                        lambda: (mon._pss is not None or mon._alerting is not None
                                 or mon.config.logs(mon.step)), spent)


def pre_clip_norms(tap: PreClipNorms | None, layers, applied: Sequence[float] | None = None) -> dict[str, float]:
    """``{layer name: ‖G‖_F before clipping}`` for ``layers`` (each with a gradient).

    A layer the tap did not record (a gradient set by hand, no tap), or whose current
    gradient is not finite, gets its current norm: ``applied`` when given, else computed. A uniform exact power-of-two ratio between the
    recorded and the current norms is fp16 loss scaling undone by ``GradScaler.unscale_``
    (multiplying by ``2^-k`` is exact), not clipping: the current norms are then the true ones.
    """
    recorded = tap.take([l.param for l in layers]) if tap is not None else [None] * len(layers)
    if applied is None:
        missing = [i for i, r in enumerate(recorded) if r is None]
        computed = norms.tensor_norms([layers[i].param.grad for i in missing])
        current: list[float | None] = [None] * len(layers)
        for i, value in zip(missing, computed):
            current[i] = value
    else:
        current = list(applied)
    # a non-finite gradient the optimizer would apply wins (set after the backward, by user
    # code or a communication hook): PSS must trigger on it and the logs must show it
    out = [c if r is None or (c is not None and not math.isfinite(c)) else r
           for r, c in zip(recorded, current)]
    if applied is not None and _loss_scaled(out, applied):
        out = list(applied)
    return {l.name: float(v) for l, v in zip(layers, out)}


def _loss_scaled(pre: Sequence[float], applied: Sequence[float]) -> bool:
    pre_g, app_g = norms.global_norm(pre), norms.global_norm(applied)
    if not (app_g > 0 and math.isfinite(pre_g) and pre_g > app_g * 1.5):
        return False
    ratio = pre_g / app_g
    return abs(math.log2(ratio) - round(math.log2(ratio))) < 1e-5


def global_norm_tags(pre: Iterable[float], applied: Sequence[float]) -> dict[str, float]:
    """``train/grad_norm`` before clipping; ``train/grad_norm_applied`` when it differs."""
    pre_g, app_g = norms.global_norm(pre), norms.global_norm(applied)
    out = {schema.TAG_GLOBAL_GRAD_NORM: pre_g}
    if not math.isclose(pre_g, app_g, rel_tol=1e-5, abs_tol=1e-12):
        out[schema.TAG_GLOBAL_GRAD_NORM_APPLIED] = app_g
    return out
