"""Alerts in the job and the flight recorder (SPEC 8): what the hook calls each step.

Every optimizer step (logged or not) the job keeps the cheap values: per-layer gradient
norms and the global one (one fused reduction), per-layer update ratios ``‖ΔW‖/‖W‖`` (the
weights copied into preallocated buffers before the step) and the loss passed to
``Monitor.log``. They go into a ring buffer of the last ``record_steps`` (K) steps, and,
with the logged step's full record where there is one, to the alert rules
(``monitor.alerts``). Step ``t``'s rules run when it is complete: in the optimizer's pre-step
hook of step ``t + 1`` (its gradients computed, its update not yet applied) or at
``close()``. When a rule fires at step ``t``:

- the step's record gets ``alert/<rule> = 1.0`` and a line of the text ``alert/events``
  (a step that was not a logged one is written with its cheap values);
- the flight recorder writes the ring's K steps before ``t`` as events of their own steps,
  and the next K steps are logged like logged steps (norms, update ratios, rates, sigma_max,
  stable rank; SJE and the NTK, about a training step each, keep their own schedule);
- ``on_alert(alert)`` is called (it can checkpoint, change the LR before step ``t + 1``'s
  update, or stop). A callback that raises is logged once and counted in
  ``alert/callback_errors``; training goes on.

A rule that fires again within ``cooldown`` steps is silenced and counted in
``alert/suppressed`` (the storm limit). Costs: see the README, "Alerts".

In a torch.distributed job (SPEC 7-8) the rules see the whole job's values: the gradient
norms of the whole tensors (one all-reduce per step that is not logged, shared with PSS) and,
on logged steps, rank 0's merged record. Rank 0 decides each step's firings and alone writes;
one broadcast per step (a count, and the alerts themselves when there are any) gives every
rank the same decision at the same step, so every rank calls ``on_alert`` and logs the same
flight-recorder steps, whose collectives stay matched.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from monitor import patterns, schema
from monitor.alerts import DEFAULT_RULES, Alert, AlertEngine, AlertRule
from monitor.distributed import CommError
from monitor.metrics import norms

log = logging.getLogger("monitor")
STORM = 10  # suppressed firings of one rule before the alert-storm warning


@dataclass(frozen=True)
class AlertConfig:
    """``watch(alerts=...)``: the rules, the storm limit, the flight recorder."""

    rules: tuple[AlertRule, ...] = DEFAULT_RULES
    cooldown: int = 50  # steps a rule stays silent after firing (storm limit)
    record_steps: int = 32  # K: steps the ring holds and steps logged after a firing (0: off)
    record_updates: bool = False  # update ratios every step too (one copy of the weights,
    #                               +1.4% of a demo step: over the 1% budget, so off)

    def __post_init__(self) -> None:
        rules = tuple(self.rules)
        bad = [r for r in rules if not isinstance(r, AlertRule)]
        if bad:
            raise TypeError(f"AlertConfig.rules: expected AlertRule objects, got {bad[0]!r}")
        object.__setattr__(self, "rules", rules)
        AlertEngine(rules, self.cooldown)  # validates names and cooldown
        if not (isinstance(self.record_steps, int) and not isinstance(self.record_steps, bool)
                and self.record_steps >= 0):
            raise ValueError(f"AlertConfig.record_steps={self.record_steps!r}: expected an "
                             "integer >= 0 (0: no flight recorder)")

    @classmethod
    def of(cls, alerts: Any) -> "AlertConfig | None":
        """``watch(alerts=...)``: None/False (off), True (defaults), rules, or an AlertConfig."""
        if alerts is None or alerts is False:
            return None
        if alerts is True:
            return cls()
        if isinstance(alerts, AlertConfig):
            return alerts
        if isinstance(alerts, AlertRule):
            return cls(rules=(alerts,))
        if isinstance(alerts, (list, tuple)):
            return cls(rules=tuple(alerts))
        raise TypeError(f"watch(alerts=...): expected True, a list of AlertRule or an "
                        f"AlertConfig, got {type(alerts).__name__}")


class JobAlerts:
    """The hook's side: cheap values each step, the ring, the rules, the callback."""

    def __init__(self, config: AlertConfig, layers: Sequence[Any], layer_metrics: set[str],
                 on_alert: Callable[[Alert], Any] | None, write: Callable,
                 comm: Any = None) -> None:
        if on_alert is not None and not callable(on_alert):
            raise TypeError(f"watch(on_alert=...): expected a callable, got {on_alert!r}")
        self.config = config
        self.engine = AlertEngine(config.rules, config.cooldown)
        # the K steps before a trigger, and the trigger
        self.ring: collections.deque = collections.deque(maxlen=config.record_steps + 1)
        self.dense_until = -1  # steps <= this are logged in full (after a firing)
        self.callback_errors = 0
        self._layers = [l for l in layers if l.param.requires_grad]
        self._on_alert, self._write = on_alert, write
        self._comm = comm  # a distributed job's monitor.distributed.Comm: rank 0 decides
        self._buffers: list[torch.Tensor] | None = None
        self._buffers_valid = False  # the buffers hold this step's weights before the update
        self._records = 0  # logged records seen (to report rules whose signal never shows)
        self._values: dict[str, Any] = {}  # the running step's cheap values
        self._storm_said: set[str] = set()
        self._startup = self._check_rules(layer_metrics)

    # ------------------------------------------------------------------ per step
    def dense(self, step: int) -> bool:
        return step <= self.dense_until

    def before_update(self, record: Any | None,
                      grad_norms: dict[str, float] | None = None) -> None:
        """Gradients final, weights not yet updated (the record, if this step is logged).

        ``grad_norms``: on a step that is not logged, the per-layer norms before the user's
        clipping (``monitor.preclip``), so a clipped job's spike is still seen; without them
        the norms of the gradients the optimizer will apply are computed here."""
        values = self._values = {}
        if record is not None:
            values.update(_cheap_of(record.scalars))
        else:
            if grad_norms is None:
                with_grad = [l for l in self._layers if l.param.grad is not None]
                grad_norms = dict(zip((l.name for l in with_grad),
                                      norms.tensor_norms([l.param.grad for l in with_grad])))
            watched = {l.name for l in self._layers}
            gnorms = [g for name, g in grad_norms.items() if name in watched]
            for name, g in grad_norms.items():
                if name in watched:
                    values[schema.layer_tag(schema.GRAD_NORM, name)] = g
            values[schema.TAG_GLOBAL_GRAD_NORM] = norms.global_norm(gnorms)
        self._buffers_valid = self.config.record_updates and record is None
        if self._buffers_valid:  # a logged step copies the weights itself
            params = [l.param.detach() for l in self._layers]
            if self._buffers is None or any(b.shape != p.shape or b.dtype != p.dtype
                                            for b, p in zip(self._buffers, params)):
                self._buffers = [torch.empty_like(p) for p in params]
            torch._foreach_copy_(self._buffers, params)

    def after_update(self, record: Any | None) -> None:
        """The optimizer has stepped: update ratios from the buffers (logged steps have them)."""
        if record is not None:
            self._values.update(_cheap_of(record.scalars, ("update_ratio",)))
            return
        if not self._buffers_valid:
            return
        self._buffers_valid = False
        params = [l.param.detach() for l in self._layers]
        before = norms._norm_tensors(self._buffers)
        torch._foreach_sub_(self._buffers, params)  # in place: W_before - W_after, no allocation
        n = len(params)
        values = norms._to_floats(before + norms._norm_tensors(self._buffers))
        for layer, w, d in zip(self._layers, values[:n], values[n:]):
            if w > 0:
                self._values[schema.layer_tag("update_ratio", layer.name)] = d / w

    def log(self, values: dict[str, Any]) -> None:
        """Values passed to ``Monitor.log`` (kept as given: no device sync until the step ends)."""
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach()  # keep no autograd graph alive until the step ends
            self._values[schema.TAG_LOSS if key == "loss" else key] = value

    def end_step(self, step: int, record: Any | None, make_record: Callable[[int], Any]) -> Any:
        """Step ``step`` is complete: ring, rules, and on a firing the recorder and callback.
        Returns the step's record (a new one when the step was not logged but fired)."""
        values = {k: _as_float(v) for k, v in self._values.items()}
        self._values = {}
        deciding = self._comm is None or self._comm.rank == 0
        if record is not None and deciding:
            self._report_rule_problems(record)
        if self.config.record_steps:
            self.ring.append((step, values))
        full = {**values, **record.scalars} if record is not None else values
        alerts = self.engine.update(step, full) if deciding else []
        self._say_storms()
        if self._comm is not None:
            alerts = self._shared(alerts)
        if not alerts:
            self._write_counts(record)
            return record
        if record is None:
            record = make_record(step)
            record.scalars.update(values)
        self._write_ring(step, record)
        for alert in alerts:
            record.scalars[schema.alert_tag(alert.rule)] = 1.0
        record.texts[schema.TAG_ALERT_EVENTS] = "\n".join(f"- {a.describe()}" for a in alerts)
        if self.config.record_steps:
            self.dense_until = max(self.dense_until, step + self.config.record_steps)
        for alert in alerts:
            log.warning("monitor: alert %s", alert.describe())
            self._call(alert, record)
        self._write_counts(record)
        return record

    # ------------------------------------------------------------------ helpers
    def _shared(self, alerts: list[Alert]) -> list[Alert]:
        """Rank 0's firings on every rank: a count broadcast each step (8 bytes), the alerts
        pickled only when there are any. Once the monitor's collectives are off (a rank
        died or stalled: said once by ``Comm``), each rank keeps its own decision."""
        comm = self._comm
        if comm.broken:
            return alerts
        try:
            count = torch.tensor([len(alerts)], dtype=torch.int64, device=comm.device)
            if int(comm.broadcast_tensor(count).item()) == 0:
                return []
            return comm.broadcast_object(alerts if comm.rank == 0 else None)
        except CommError:  # recorded by Comm; training goes on
            return alerts

    def _write_ring(self, step: int, record: Any) -> None:
        """Write the ring's steps before ``step`` (in step order; a logged step among them is
        written again with the same values, which keeps TensorBoard's out-of-order purge
        from dropping its values)."""
        for s, vals in list(self.ring):
            if s < step and vals:
                try:
                    self._write(s, vals)
                except Exception as err:  # never let the monitor kill the job
                    record.fail("alert", "flight_recorder", f"writing step {s}: {err}")
                    return

    def _call(self, alert: Alert, record: Any) -> None:
        if self._on_alert is None:
            return
        try:
            self._on_alert(alert)
        except Exception as err:  # the user's callback must not stop training
            self.callback_errors += 1
            if self.callback_errors == 1:
                log.warning("monitor: on_alert raised %r at step %d; training goes on (errors "
                            "are counted in %s)", err, alert.step, schema.TAG_ALERT_CALLBACK_ERRORS,
                            exc_info=True)
            record.fail("alert", "on_alert", repr(err))

    def _write_counts(self, record: Any | None) -> None:
        if record is None:
            return
        suppressed = sum(self.engine.suppressed.values())
        if suppressed:
            record.scalars[schema.TAG_ALERT_SUPPRESSED] = float(suppressed)
        if self.callback_errors:
            record.scalars[schema.TAG_ALERT_CALLBACK_ERRORS] = float(self.callback_errors)

    def _say_storms(self) -> None:
        for name, count in self.engine.suppressed.items():
            if count >= STORM and name not in self._storm_said:
                self._storm_said.add(name)
                log.warning("monitor: alert rule %r keeps firing within its cooldown of %d steps "
                            "(an alert storm, %d silenced so far): firings within the cooldown "
                            "are not reported, only counted in %s", name, self.config.cooldown, count,
                            schema.TAG_ALERT_SUPPRESSED)

    def _report_rule_problems(self, record: Any) -> None:
        for name, reason in self._startup:
            record.fail("alert", name, reason)
        self._startup = []
        self._records += 1
        if self._records == 3:  # a global signal never seen in three logged records: say so
            for rule in self.engine.unseen():
                if not rule.per_layer:
                    reason = (f"rule {rule.name!r}: tag {rule.signal!r} has not appeared in the "
                              f"first {self._records} logged steps (pass it with Monitor.log?); "
                              "the rule cannot fire until it does")
                    log.warning("monitor: %s", reason)
                    record.fail("alert", rule.name, reason)

    def _check_rules(self, layer_metrics: set[str]) -> list[tuple[str, str]]:
        """Per-layer rules naming a metric this job does not compute, or no monitored layer:
        said once (warning, and ``health/failures`` of the first record); the job goes on."""
        out = []
        names = [l.name for l in self._layers]
        for rule in self.config.rules:
            if not rule.per_layer:
                continue
            state = next(s for s in self.engine.states if s.rule is rule)
            matched = set(patterns.select_or_raise(f"AlertRule({rule.name!r}).layers",
                                                   rule.layers, names))
            state._layer_ok.update((n, n in matched) for n in names)  # matched once, here
            if rule.signal not in layer_metrics:
                reason = (f"rule {rule.name!r}: metric {rule.signal!r} is not computed in this "
                          f"job (computed: {sorted(layer_metrics)}); the rule never fires")
            elif not matched:
                reason = (f"rule {rule.name!r}: layers={rule.layers!r} matches no monitored "
                          f"layer (e.g. {names[:3]}); the rule never fires")
            else:
                continue
            log.warning("monitor: %s", reason)
            out.append((rule.name, reason))
        return out


def _cheap_of(scalars: dict[str, float], keys: Iterable[str] = ("grad_norm",)) -> dict[str, float]:
    prefixes = tuple(k + "/" for k in keys)
    out = {t: v for t, v in scalars.items() if t.startswith(prefixes)}
    for tag in (schema.TAG_GLOBAL_GRAD_NORM, schema.TAG_LOSS):
        if tag in scalars and "grad_norm" in keys:
            out[tag] = scalars[tag]
    return out


def _as_float(value: Any) -> float:
    try:
        if isinstance(value, torch.Tensor):
            return float(value.detach().float().item())
        return float(value)
    except Exception:  # a bad value is reported by Monitor.log; here it is just missing
        return math.nan


def computed_metrics(config: Any, layers: Sequence[Any]) -> set[str]:
    """Per-layer metric keys a job with this MonitorConfig and these layers computes."""
    out = {"grad_norm", "update_ratio", "param_norm", "lr", "lr_effective"}
    if any(l.spectral for l in layers):
        out |= {"stable_rank", "sigma_max"}
        if config.sje_every:
            out.add("sje")
        if config.ntk_every:
            out.add("ntk_eig")
    return out


def make_job_alerts(alerts: Any, on_alert: Any, layers: Sequence[Any], config: Any,
                    write: Callable, comm: Any = None) -> JobAlerts | None:
    """``watch(alerts=..., on_alert=...)`` to a :class:`JobAlerts` (None when alerts are off)."""
    cfg = AlertConfig.of(alerts)
    if cfg is None:
        if on_alert is not None:
            raise ValueError("watch(on_alert=...) needs alerts: pass alerts=True (the default "
                             "rules) or a list of monitor.alerts.AlertRule")
        return None
    return JobAlerts(cfg, layers, computed_metrics(config, layers), on_alert, write, comm)


def refuse_distributed(alerts: Any, world: int) -> None:
    """What alerts cannot do in a torch.distributed job yet, refused with the fix before
    anything is written: update ratios at every step (``record_updates``) would be a
    shard's, and the whole tensors' need one more all-reduce per step."""
    cfg = AlertConfig.of(alerts)
    if world > 1 and cfg is not None and cfg.record_updates:
        raise ValueError(f"watch(alerts=AlertConfig(record_updates=True)): update ratios at every "
                         f"step are not supported in a torch.distributed job yet (world size "
                         f"{world}); use record_updates=False (update ratios of logged steps, "
                         "the default)")
