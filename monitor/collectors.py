"""Per-step collectors for a torch.distributed job: what to compute, for which tensors, when,
and on which rank (SPEC section 7).

Like Cockpit's quantities, each collector decides *when* (``should_compute(step)``) apart
from *what* (``collect(ctx)``); the metric arithmetic stays in ``monitor.metrics``. The
:class:`DistributedMetrics` runner gives each expensive per-layer metric (σ1 / SR of a
replicated layer, SJE, NTK) to one rank, the layer's *owner* (a balanced split by size,
:func:`monitor.distributed.assign_owners`), runs the collectors on every rank, and gathers
what each rank computed to rank 0, which alone writes.

Collectives of one logged step (all ranks, same order):

1. one float64 all-reduce of every layer's local squared gradient and weight sums and the
   non-finite counts (:class:`Norms`);
2. σ1 of the row-sharded (FSDP2) layers (:class:`Spectral`): at most ``power_iters``
   all-reduces for all of them together (power iteration on the shards), or one gather per
   owner rank of its whole matrices (``sharded_sigma``); replicated (DDP) layers are
   computed by their owner alone;
3. on SJE steps, one gather per owner rank of the gradients (and weights, unless gathered
   for σ1) of the sharded layers it owns (:class:`SJE`);
4. one gather of every rank's results to rank 0 (the counts of ``health/sigma_unconverged``
   summed there);
5. after ``optimizer.step()``, one all-reduce of the update's squared sums (:meth:`update_norms`).

The NTK (:class:`NTK`) needs no collective: the owner of a layer computes it from the first
``ntk_probe`` samples of its own micro-batch (activations are not sharded by DDP or FSDP2).
"""

from __future__ import annotations

import abc

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from monitor import schema
from monitor.config import MonitorConfig
from monitor.distributed import (REPLICATED, ROWS, SHARDED, UNSUPPORTED, Comm, CommError,
                                 assign_owners, is_dtensor, local, placement)
from monitor.metrics import energy, sharded, spectral, views
from monitor.schema import layer_tag

#: ``sharded_sigma="auto"`` gathers whole matrices to their owners for σ1 while no rank
#: receives more than this per logged step (benchmarks/results/distributed.md)
GATHER_MAX_MB = 1024


@dataclass
class Target:
    """One monitored tensor as the collectors see it."""

    name: str
    param: nn.Parameter
    kind: str  # matrix-view kind (views.layer_kinds)
    spectral: bool  # has a matrix view
    placement: str  # REPLICATED, ROWS, SHARDED or UNSUPPORTED (monitor.distributed)
    reason: str  # why unsupported (or why spectral metrics are), else ""
    owner: int  # the rank computing its expensive metrics
    v: torch.Tensor | None = None  # power-iteration warm start


@dataclass
class StepContext:
    """What the collectors of one step share. ``own`` holds this rank's results (sent to
    rank 0); ``record`` is the step's record (on every rank: values that are equal on all
    ranks go there directly; only rank 0's is written)."""

    step: int
    own: Any  # monitor.hook.StepRecord
    record: Any | None
    grad_sq: dict[str, float] = field(default_factory=dict)  # global ‖G‖² per layer
    weight_sq: dict[str, float] = field(default_factory=dict)  # global ‖W‖² per layer
    sigma: dict[str, float] = field(default_factory=dict)  # σ1 per spectral layer
    whole: dict[str, torch.Tensor] = field(default_factory=dict)  # gathered weights (owner)


class Collector(abc.ABC):
    """A metric family: ``should_compute(step)`` decides when, ``collect(ctx)`` computes."""

    def __init__(self, metrics: "DistributedMetrics") -> None:
        self.m = metrics

    def should_compute(self, step: int) -> bool:
        """Default: every step the hook logs (its schedule, and the flight recorder's steps
        after an alert): the hook runs the collectors on logged steps only."""
        return True

    @abc.abstractmethod
    def collect(self, ctx: StepContext) -> None:
        """Compute this family's values for ``ctx``'s step into ``ctx``."""


class Norms(Collector):
    """Gradient norms, global norm, non-finite counts: one all-reduce for all tensors.
    ``weights=False`` (PSS on a step that is not logged): the gradients only."""

    def __init__(self, metrics: "DistributedMetrics", weights: bool = True) -> None:
        super().__init__(metrics)
        self.weights = weights

    def collect(self, ctx: StepContext) -> None:
        m = self.m
        targets = m.counted
        mine = [t.placement != REPLICATED or t.owner == m.rank for t in targets]
        grads = [local(t.param.grad) if c and t.param.grad is not None else None
                 for t, c in zip(targets, mine)]
        weights = [local(t.param.detach()) if c and self.weights else None
                   for t, c in zip(targets, mine)]
        gsq, gnf = sharded.local_sq_sums(grads)
        wsq, wnf = sharded.local_sq_sums(weights)
        total = sharded.reduce_sums([*gsq, *wsq, float(gnf), float(wnf)], m.comm)
        n = len(targets)
        with_grad = [t.param.grad is not None for t in targets]
        ctx.grad_sq = {t.name: total[i] for i, t in enumerate(targets) if with_grad[i]}
        ctx.weight_sq = {t.name: total[n + i] for i, t in enumerate(targets)}
        if ctx.record is not None:
            for name, sq in ctx.grad_sq.items():
                ctx.record.scalars[layer_tag("grad_norm", name)] = math.sqrt(sq)
            ctx.record.scalars[schema.TAG_GLOBAL_GRAD_NORM] = math.sqrt(sum(ctx.grad_sq.values()))
            ctx.record.scalars[schema.TAG_NONFINITE_GRAD] = total[2 * n]
            ctx.record.scalars[schema.TAG_NONFINITE_WEIGHT] = total[2 * n + 1]


class Spectral(Collector):
    """σ1 and stable rank. Row-sharded (FSDP2) layers: power iteration on the shards, or
    the whole matrix gathered on the owner (``DistributedMetrics.sigma_mode``); replicated
    (DDP) layers: by the owner, on its replica."""

    def collect(self, ctx: StepContext) -> None:
        m = self.m
        rows = [t for t in m.spectral_targets if t.placement == ROWS]
        if m.sigma_mode == "power":
            blocks = [local(t.param.detach()).reshape(local(t.param).shape[0], _width(t))
                      for t in rows]  # (rows_r, rest): a rank may hold no row
            results = sharded.power_sigma_rows(
                blocks, [t.v for t in rows], [ctx.weight_sq.get(t.name, 0.0) for t in rows],
                m.comm, max_iters=m.config.power_iters, tol=m.config.power_tol)
            for t, res in zip(rows, results):
                if not res.converged and math.isfinite(res.sigma) and res.sigma > 0:
                    t.v = res.v  # the next logged step goes on from it
                    if m.rank == t.owner:  # outside the stated accuracy: said, not logged
                        _count_unconverged(ctx.own)
                        ctx.own.fail("stable_rank", t.name, (
                            f"sigma_max not converged in {res.iters} power iterations on the "
                            f"shards (relative residual {res.residual:.2e} > power_tol "
                            f"{m.config.power_tol:g}); raise power_iters or use "
                            "sharded_sigma='gather'"))
                    continue
                self._record(ctx, t, res.sigma, res.v, ctx.record, report=m.rank == t.owner)
        else:
            for t, W in m.gather_to_owners(rows, lambda t: t.param.detach()):
                ctx.whole[t.name] = W  # SJE reuses it
                self._owned(ctx, t, W)
        for t in m.spectral_targets:
            if t.placement == REPLICATED and t.owner == m.rank:
                self._owned(ctx, t, t.param.detach())

    def _owned(self, ctx: StepContext, t: Target, W: torch.Tensor) -> None:
        """σ1 of a whole matrix this rank owns: the single-process power iteration."""
        m = self.m
        try:
            res = spectral.power_sigma_max(views.matrix_view(W, t.kind), t.v,
                                           max_iters=m.config.power_iters, tol=m.config.power_tol)
        except Exception as err:
            t.v = None
            ctx.own.fail("stable_rank", t.name, str(err))
            return
        if not res.converged and math.isfinite(res.sigma) and res.sigma > 0:
            t.v = res.v  # outside the stated accuracy: said, not logged (as in one process)
            _count_unconverged(ctx.own)
            ctx.own.fail("stable_rank", t.name, res.reason + "; raise power_iters")
            return
        self._record(ctx, t, res.sigma, res.v, ctx.own, report=True)

    @staticmethod
    def _record(ctx: StepContext, t: Target, sigma: float, v: torch.Tensor | None,
                into: Any | None, report: bool) -> None:
        if not (math.isfinite(sigma) and sigma > 0):
            t.v = None
            if report:
                ctx.own.fail("stable_rank", t.name,
                             f"sigma_max is {sigma} (zero or non-finite weights)")
            return
        t.v = v
        ctx.sigma[t.name] = sigma
        if into is not None:
            into.scalars[layer_tag("sigma_max", t.name)] = sigma
            into.scalars[layer_tag("stable_rank", t.name)] = ctx.weight_sq[t.name] / sigma ** 2


class SJE(Collector):
    """Stable Jacobian energy, by each layer's owner on the whole matrices (gathered from
    the shards under FSDP2, on SJE steps only; the weight is not gathered twice)."""

    def should_compute(self, step: int) -> bool:
        return self.m.config.sje_at(step)

    def collect(self, ctx: StepContext) -> None:
        m = self.m
        # the same list on every rank (it decides the gathers): not from this rank's sigma
        due = [t for t in m.spectral_targets if t.param.grad is not None]
        rows = [t for t in due if t.placement == ROWS]
        if m.sigma_mode == "power":
            for t, W in m.gather_to_owners(rows, lambda t: t.param.detach()):
                ctx.whole[t.name] = W
        for t, G in m.gather_to_owners(rows, lambda t: t.param.grad):
            self._sje(ctx, t, ctx.whole[t.name], G)
        for t in due:
            if t.placement == REPLICATED and t.owner == m.rank:
                self._sje(ctx, t, t.param.detach(), t.param.grad.detach())

    def _sje(self, ctx: StepContext, t: Target, W: torch.Tensor, G: torch.Tensor) -> None:
        if t.name not in ctx.sigma:
            return  # sigma_max failed: recorded already
        try:  # k from the stable rank logged for this step, as in one process
            sr = ctx.weight_sq[t.name] / ctx.sigma[t.name] ** 2
            value, _k = energy.sje(views.matrix_view(W, t.kind), views.matrix_view(G, t.kind),
                                   k_max=self.m.config.sje_k_max, sr=sr)
            if not math.isfinite(value):
                raise ValueError(f"SJE is {value}")
            ctx.own.scalars[layer_tag("sje", t.name)] = value
        except Exception as err:
            ctx.own.fail("sje", t.name, str(err))


class NTK(Collector):
    """Per-layer NTK eigenvalue on the owner's own probe samples (the hook's capture holds
    the owned layers only; ``ntk_into`` is the hook's single-process NTK step)."""

    def __init__(self, metrics: "DistributedMetrics", ntk_into: Callable[[Any], None]) -> None:
        super().__init__(metrics)
        self.ntk_into = ntk_into

    def collect(self, ctx: StepContext) -> None:
        self.ntk_into(ctx.own)


def _count_unconverged(own: Any) -> None:
    """One more layer whose sigma_max missed power_tol on this rank (summed on rank 0)."""
    tag = schema.TAG_SIGMA_UNCONVERGED
    own.scalars[tag] = own.scalars.get(tag, 0.0) + 1.0


def _width(t: Target) -> int:
    return math.prod(t.param.shape[1:])


class DistributedMetrics:
    """Runs the collectors of a logged step on every rank of a distributed job.

    Args:
        layers: the hook's layers (``name``, ``param``, ``kind``, ``spectral``).
        comm: the monitor's :class:`monitor.distributed.Comm`.
        config: the monitor's settings (schedules, power iteration, SJE cap).
        make_record: ``step -> StepRecord`` (the hook's record type).
        model: the watched model (to notice parameters replaced after ``watch()``).
    """

    def __init__(self, layers: Sequence[Any], comm: Comm, config: MonitorConfig,
                 make_record: Callable[[int], Any], model: nn.Module | None = None) -> None:
        self.comm, self.config, self.make_record, self.model = comm, config, make_record, model
        self.rank, self.world = comm.rank, comm.world
        self.targets = self._targets(layers)
        self.counted = [t for t in self.targets if t.placement != UNSUPPORTED]
        self.spectral_targets = [t for t in self.counted if t.spectral
                                 and t.placement in (REPLICATED, ROWS)]
        self._said: set[str] = set()
        self.sigma_mode = self._sigma_mode(config.sharded_sigma)

    def _sigma_mode(self, wanted: str) -> str:
        """``power`` or ``gather`` for σ1 of row-sharded layers; ``auto`` gathers when no
        rank would receive more than GATHER_MAX_MB of whole matrices per logged step
        (small models: one gather beats tens of latency-bound all-reduces; large ones: the
        power iteration moves ``iterations x sum(n)`` floats instead of every matrix)."""
        if wanted != "auto":
            return wanted
        per_rank = [0] * self.world
        for t in self.spectral_targets:
            if t.placement == ROWS:
                per_rank[t.owner] += 4 * t.param.numel()
        return "gather" if max(per_rank) <= GATHER_MAX_MB * 2**20 else "power"

    def gather_to_owners(self, targets: Sequence[Target], tensor: Callable[[Target], torch.Tensor]):
        """``(target, whole tensor)`` for the row-sharded ``targets`` this rank owns, after
        one gather per owner rank (every rank takes part in each)."""
        out = []
        for dst in range(self.world):
            mine = [t for t in targets if t.owner == dst]
            if not mine:
                continue
            wholes = sharded.gather_whole([local(tensor(t)) for t in mine],
                                          [t.param.shape for t in mine], self.comm, dst)
            out += list(zip(mine, wholes)) if wholes is not None else []
        return out

    def _targets(self, layers: Sequence[Any]) -> list[Target]:
        any_dtensor = any(is_dtensor(l.param) for l in layers)
        costs = [l.param.numel() * (4 if l.spectral else 1) for l in layers]
        owners = assign_owners(costs, self.world)
        out = []
        for l, owner in zip(layers, owners):
            kind, reason = placement(l.param, self.world)
            if kind == REPLICATED and any_dtensor and not is_dtensor(l.param):
                kind, reason = UNSUPPORTED, (
                    "a plain tensor in a model whose other parameters are DTensors (FSDP2): "
                    "fully_shard does not synchronise its gradient, so it differs per rank; "
                    "apply fully_shard to the root module too (fully_shard(model) after the blocks)")
            out.append(Target(l.name, l.param, l.kind, l.spectral, kind, reason, owner))
        return out

    def describe(self) -> dict[str, Any]:
        """For run.json: the world size, and each layer's placement and owner rank."""
        return {"world": self.world, "timeout_s": self.comm.timeout_s, "sigma": self.sigma_mode,
                "layers": {t.name: {"placement": t.placement, "owner": t.owner} for t in self.targets}}

    def owned_names(self) -> dict[int, str]:
        """``{id(param): name}`` of the spectral layers this rank owns (its NTK capture)."""
        return {id(t.param): t.name for t in self.spectral_targets
                if t.owner == self.rank and t.param.requires_grad}

    def collectors(self, ntk_into: Callable[[Any], None] | None) -> list[Collector]:
        found = [Norms(self), Spectral(self), SJE(self)]
        return found + ([NTK(self, ntk_into)] if ntk_into is not None else [])

    def pre_step(self, record: Any, step: int,
                 ntk_into: Callable[[Any], None] | None) -> dict[str, float]:
        """A logged step, gradients final: every rank computes its share; rank 0's
        ``record`` gets everything. Returns the per-layer gradient norms (equal on every
        rank). Never raises a failed collective: it is recorded."""
        own = self.make_record(step)
        ctx = StepContext(step, own, record)
        if self.comm.broken:
            self._fail(record, self.comm.broken)
            return {}
        self._check_replaced(record if self.rank == 0 else None)
        try:
            with self.comm.in_step(f"step {step}"):
                for collector in self.collectors(ntk_into):
                    if collector.should_compute(step):
                        collector.collect(ctx)
                self._merge(record, own)
        except CommError as err:
            self._fail(record, str(err))
        return {name: math.sqrt(sq) for name, sq in ctx.grad_sq.items()}

    def pss_args(self) -> dict[str, Any]:
        """The distributed PSS controller's arguments: the monitor's comm, placements, owners."""
        return {"comm": self.comm, "placements": {t.name: t.placement for t in self.targets},
                "owners": {t.name: t.owner for t in self.targets}}

    def grad_norms(self) -> tuple[float, dict[str, float]]:
        """Global and per-layer gradient norms (one all-reduce; PSS on non-logged steps)."""
        ctx = StepContext(-1, self.make_record(-1), None)
        with self.comm.in_step("gradient norms"):
            Norms(self, weights=False).collect(ctx)
        layer = {name: math.sqrt(sq) for name, sq in ctx.grad_sq.items()}
        return math.sqrt(sum(ctx.grad_sq.values())), layer

    def snapshot(self) -> list[torch.Tensor] | None:
        """This rank's part of every layer's weights (the update's starting point); None
        once the collectives are off (no update metrics then)."""
        if self.comm.broken:
            return None
        return [local(t.param.detach()).clone() for t in self.targets]

    def update_norms(self, before: Sequence[torch.Tensor]) -> tuple[list[float], list[float]]:
        """``(‖W_after - W_before‖, ‖W_before‖)`` per layer, whole tensors (one all-reduce);
        nan for an unsupported layer."""
        mine = [t.placement not in (REPLICATED, UNSUPPORTED) or
                (t.placement == REPLICATED and t.owner == self.rank) for t in self.targets]
        deltas = [local(t.param.detach()) - b if c else None
                  for t, b, c in zip(self.targets, before, mine)]
        with self.comm.in_step("update norms"):
            dsq, _ = sharded.local_sq_sums(deltas)
            bsq, _ = sharded.local_sq_sums([b if c else None for b, c in zip(before, mine)])
            total = sharded.reduce_sums([*dsq, *bsq], self.comm)
        n = len(self.targets)
        nan = [t.placement == UNSUPPORTED for t in self.targets]
        return ([math.nan if nan[i] else math.sqrt(total[i]) for i in range(n)],
                [math.nan if nan[i] else math.sqrt(total[n + i]) for i in range(n)])

    def update_values(self, before: Sequence[torch.Tensor], grad_norms: dict[str, float]
                      ) -> tuple[list[float], list[float], dict[int, float]]:
        """``(‖W_before‖, update ratio ‖ΔW‖/‖W_before‖, {layer index: lr_effective ‖ΔW‖/‖G‖})``
        of the whole tensors, as ``norms.update_ratio`` / ``norms.lr_effective`` give them in
        one process (nan where a denominator is 0; ``grad_norms``: this step's whole-tensor
        gradient norms by layer name)."""
        deltas, pnorms = self.update_norms(before)
        ratios = [d / w if w > 0 else math.nan for d, w in zip(deltas, pnorms)]
        rates = {i: d / grad_norms[t.name] for i, (t, d) in enumerate(zip(self.targets, deltas))
                 if grad_norms.get(t.name, 0.0) > 0}
        return pnorms, ratios, rates

    # ------------------------------------------------------------------ helpers
    def _merge(self, record: Any, own: Any) -> None:
        gathered = self.comm.gather_objects((own.scalars, own.texts, own.failures), dst=0)
        if gathered is None:
            return
        unconverged = 0.0  # a count per rank (its owned layers): the job's is their sum
        for scalars, texts, failures in gathered:
            unconverged += scalars.pop(schema.TAG_SIGMA_UNCONVERGED, 0.0)
            record.scalars.update(scalars)
            for tag, text in texts.items():
                record.texts[tag] = record.texts.get(tag, "") + text
            record.failures.extend(failures)
        if unconverged:
            record.scalars[schema.TAG_SIGMA_UNCONVERGED] = unconverged
        self._say_unsupported(record)

    def _say_unsupported(self, record: Any) -> None:
        """Each unsupported tensor named once, in the run's 'unsupported' text."""
        lines = []
        for t in self.targets:
            if t.name in self._said:
                continue
            if t.placement == UNSUPPORTED:
                lines.append(f"- all metrics/{t.name}: {t.reason}\n")
            elif t.placement == SHARDED and t.spectral:
                lines.append(f"- sigma_max, stable_rank, sje, ntk_eig/{t.name}: {t.reason}\n")
            else:
                continue
            self._said.add(t.name)
        if any(t.placement == UNSUPPORTED for t in self.targets) and "global" not in self._said:
            self._said.add("global")
            lines.append(f"- {schema.TAG_GLOBAL_GRAD_NORM}: over the supported tensors only\n")
        if lines:
            record.texts[schema.TAG_UNSUPPORTED] = record.texts.get(schema.TAG_UNSUPPORTED, "") + "".join(lines)

    def _check_replaced(self, record: Any) -> None:
        """Say once when the model's parameters are not the ones watched (wrapped by
        ``fully_shard`` / ``parallelize_module`` after ``watch()``: those replace them)."""
        if "replaced" in self._said or self.model is None:
            return
        now = {name: id(p) for name, p in self.model.named_parameters()}
        stale = [t.name for t in self.targets if now.get(t.name, id(t.param)) != id(t.param)]
        if stale:
            self._said.add("replaced")
            if record is not None:
                record.texts[schema.TAG_UNSUPPORTED] = record.texts.get(schema.TAG_UNSUPPORTED, "") + (
                    f"- all metrics/{', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''}: the "
                    "model's parameters were replaced after watch() (fully_shard or "
                    "parallelize_module applied after watch()?); call monitor.watch() after "
                    "wrapping the model\n")

    def _fail(self, record: Any, reason: str) -> None:
        if record is not None:
            record.fail("hook", "distributed", reason)

