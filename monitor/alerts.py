"""Alert rules (SPEC 8): one module, used by the job (``watch(alerts=...)``) and the dashboard.

Standard library only (and ``monitor.patterns``, whose ``regex`` matches ``layers`` under a
time limit), like ``monitor.pss.detect``, whose rule it reuses. A rule maps the
values of one step (``{tag: value}``: global tags such as ``train/grad_norm`` and per-layer
tags ``<metric>/<layer>``) to fire / not fire. Three kinds, on a signal ``x_t``:

- ``ratio``: ``x_t / m_{t-1} > threshold``, with ``m`` the capped moving average of
  :class:`monitor.pss.detect.Detector` (rate ``alpha``): the PSS trigger, on any signal;
- ``drop``:  the same on ``1 / x_t`` (a falling signal, e.g. the stable rank);
- ``level``: ``x_t > threshold``.

A non-finite ``x_t`` always fires. No rule fires before ``warmup_steps``. A per-layer rule
(its signal a metric key such as ``grad_norm``) keeps one average per layer and fires once
per step, naming the layer whose statistic is largest. :class:`AlertEngine` adds the storm
limit: a rule that fired at step ``s`` is silent (its firings counted as suppressed) until
step ``s + cooldown``.

The defaults (:data:`DEFAULT_RULES`) come from ``benchmarks/early_warning.py``; their
measured recall, lead time and false-alarm rate are in ``benchmarks/results/early_warning.md``
and the README.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from monitor.pss.detect import Detector
from monitor import patterns, schema
from monitor.schema import METRIC_KEYS

KINDS = ("ratio", "drop", "level")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
#: names whose tag alert/<name> is taken by the engine's own tags
RESERVED = frozenset(schema.split_tag(t)[1] for t in (
    schema.TAG_ALERT_EVENTS, schema.TAG_ALERT_SUPPRESSED, schema.TAG_ALERT_CALLBACK_ERRORS))


def _real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class AlertRule:
    """One rule. ``signal``: a per-layer metric key (``grad_norm``, ``update_ratio``, ...;
    then ``layers`` selects the layers, a regex) or a global tag (``train/grad_norm``,
    ``train/loss``, a tag the job passes to ``Monitor.log``)."""

    name: str  # the tag is alert/<name>
    signal: str
    kind: str = "ratio"  # ratio, drop or level (module docstring)
    threshold: float = 2.5
    alpha: float = 0.1  # ratio/drop: rate of the moving average
    warmup_steps: int = 20  # no firing before this step (the average settles)
    layers: str = ".*"  # per-layer rules: regex on parameter names

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"AlertRule({self.name!r}).{name}={getattr(self, name)!r}: "
                              f"expected {allowed}")

        if not (isinstance(self.name, str) and _NAME.match(self.name)):
            raise ValueError(f"AlertRule.name={self.name!r}: expected letters, digits, '_', "
                             "'.' or '-' (it becomes the tag alert/<name>)")
        if self.name in RESERVED:
            raise ValueError(f"AlertRule.name={self.name!r} is reserved (alert/{self.name} is "
                             f"the monitor's own tag); choose another name")
        if not (isinstance(self.signal, str) and self.signal):
            raise bad("signal", "a metric key (e.g. 'grad_norm') or a global tag "
                                "(e.g. 'train/grad_norm')")
        if self.kind not in KINDS:
            raise bad("kind", f"one of {KINDS}")
        if not (_real(self.threshold) and self.threshold > 0):
            raise bad("threshold", "a finite number > 0")
        if self.kind != "level" and not self.threshold > 1:
            raise bad("threshold", f"a number > 1 for a {self.kind} rule (a factor)")
        if not (_real(self.alpha) and 0 < self.alpha <= 1):
            raise bad("alpha", "a number in (0, 1]")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise bad("warmup_steps", "an integer >= 0")
        if (why := patterns.problem(self.layers)) is not None:
            raise bad("layers", f"a valid regular expression ({why})")

    @property
    def per_layer(self) -> bool:
        return self.signal in METRIC_KEYS


@dataclass(frozen=True)
class Alert:
    """One firing: ``value`` is the rule's statistic (the ratio for ratio/drop rules)."""

    rule: str
    step: int
    value: float
    threshold: float
    signal: str
    layer: str = ""  # per-layer rules: the layer with the largest statistic
    layers_over: int = 0  # per-layer rules: how many layers were over the threshold

    def describe(self) -> str:
        where = f" layer `{self.layer}`" if self.layer else ""
        more = f" (and {self.layers_over - 1} other layers)" if self.layers_over > 1 else ""
        return (f"step {self.step}: rule `{self.rule}` ({self.signal}){where}{more}: "
                f"{self.value:.4g} > {self.threshold:g}")


#: Measured defaults (benchmarks/results/early_warning.md, README "Alerts"). On the spike
#: testbed's 33 labelled spikes, the global gradient-norm ratio at 7 (the lowest threshold
#: with at most 1 alarm per 1,000 control steps) caught 24 at the spike's own step or
#: before (4 of them 1+ steps ahead); no other logged or literature signal warned earlier
#: without alarming on many quiet steps, so it is the one default rule.
DEFAULT_RULES: tuple[AlertRule, ...] = (
    AlertRule("grad_norm_spike", "train/grad_norm", "ratio", threshold=7.0),
)


class RuleState:
    """The running state of one rule: one detector per series (the global one, or a layer)."""

    def __init__(self, rule: AlertRule) -> None:
        self.rule = rule
        self._prefix = rule.signal + "/"
        self._detectors: dict[str, Detector] = {}
        self._layer_ok: dict[str, bool] = {}  # layer name -> matches `layers`
        self.seen = False  # the signal appeared in some step's values

    def update(self, step: int, values: Mapping[str, float]) -> Alert | None:
        best: tuple[float, str] | None = None
        over = 0
        for layer, x in self._series(values):
            self.seen = True
            hit, stat = self._observe(layer, step, x)
            if hit:
                over += 1
                if best is None or not stat <= best[0]:  # nan/inf first
                    best = (stat, layer)
        if best is None:
            return None
        return Alert(self.rule.name, step, best[0], self.rule.threshold, self.rule.signal,
                     best[1], over if self.rule.per_layer else 0)

    def _series(self, values: Mapping[str, float]) -> Iterable[tuple[str, float]]:
        if not self.rule.per_layer:
            x = values.get(self.rule.signal)
            return () if x is None else (("", x),)
        out = []
        for tag, x in values.items():
            if tag.startswith(self._prefix):
                layer = tag[len(self._prefix):]
                ok = self._layer_ok.get(layer)
                if ok is None:  # once per layer (the job sets them all at start)
                    ok = self._layer_ok[layer] = self._matches(layer)
                if ok:
                    out.append((layer, x))
        return out

    def _matches(self, layer: str) -> bool:
        """Whether ``layers`` matches this layer's name (a match that does not finish in
        time counts as none: the pattern was valid, the name is not watched)."""
        try:
            return bool(patterns.select(self.rule.layers, [layer]))
        except patterns.PatternError:
            return False

    def _observe(self, layer: str, step: int, x: float) -> tuple[bool, float]:
        rule = self.rule
        warm = step >= rule.warmup_steps
        if rule.kind == "level":
            if not math.isfinite(x):
                return warm, math.inf
            return warm and x > rule.threshold, x
        if rule.kind == "drop":
            x = 1.0 / x if x > 0 else math.inf
        det = self._detectors.get(layer)
        if det is None:
            det = self._detectors[layer] = Detector(rule.threshold, rule.alpha, rule.warmup_steps)
        hit, ratio = det.update(float(x), step)
        return hit and warm, ratio


@dataclass
class AlertEngine:
    """All rules of a job, with the storm limit. ``update`` returns the alerts to report;
    ``suppressed[name]`` counts the firings silenced by the cooldown."""

    rules: tuple[AlertRule, ...]
    cooldown: int = 50
    suppressed: dict[str, int] = field(default_factory=dict)
    fired: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [r.name for r in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"alert rules must have distinct names; repeated: {dupes}")
        if not (isinstance(self.cooldown, int) and self.cooldown >= 1):
            raise ValueError(f"cooldown={self.cooldown!r}: expected an integer >= 1 (steps)")
        self.states = [RuleState(r) for r in self.rules]
        self._last: dict[str, int] = {}

    def update(self, step: int, values: Mapping[str, float]) -> list[Alert]:
        out = []
        for state in self.states:
            alert = state.update(step, values)
            if alert is None:
                continue
            name = alert.rule
            last = self._last.get(name)
            if last is not None and step < last + self.cooldown:
                self.suppressed[name] = self.suppressed.get(name, 0) + 1
                continue
            self._last[name] = step
            self.fired[name] = self.fired.get(name, 0) + 1
            out.append(alert)
        return out

    def unseen(self) -> list[AlertRule]:
        """Rules whose signal has not appeared in any step's values so far."""
        return [s.rule for s in self.states if not s.seen]


def replay(steps: Iterable[tuple[int, Mapping[str, float]]], rules: Iterable[AlertRule],
           cooldown: int = 50) -> list[Alert]:
    """The alerts of a logged run: ``steps`` in increasing step order, each ``(step, values)``.

    On a run logged every N steps the averages move once per logged value, so the replay
    approximates what the job, which sees every step, did (as ``monitor.pss.detect.trace``)."""
    engine = AlertEngine(tuple(rules), cooldown)
    out: list[Alert] = []
    for step, values in steps:
        out.extend(engine.update(int(step), values))
    return out
