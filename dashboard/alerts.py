"""Alerts a user should not miss, each naming its run, layer and step.

The per-layer rules and the replayed job rules are running computations over the logged
steps (:class:`Collapse`, :class:`SustainedSJE`, :class:`Replayed`): fed all rows of a tidy
table at once (:func:`find_alerts`, :func:`alerts_in`) or, in the app, only the rows each
refresh adds (:class:`RunAlerts`, one per run), with the same result.

- ``stable rank collapse`` (a "parametric singularity", SPEC 2): a layer's stable rank falls
  below ``collapse_ratio`` times the highest value it had since the first ``settle`` logged
  steps (stable ranks of randomly initialised weights fall fast at first, which is normal),
  or, at any time, below ``sr_floor`` (nearly rank one) after having been at least twice that;
- ``SJE sustained``: SJE above ``sje_threshold`` (0.8, the paper's warning level) for at
  least ``sje_steps`` consecutive logged steps;
- ``non-finite``: non-finite gradient or weight entries counted by the hook, and NaN or
  infinite metric values;
- ``monitor overhead``: the monitor's own share of wall time (``monitor/overhead``), median
  over the logged steps after the first, above ``overhead_limit`` (10%);
- ``rule <name>``: the job's alert rules (``monitor.alerts``, the same module the job runs):
  the ``alert/<rule>`` firings the job wrote, or, for a run that wrote none (alerts off),
  the default rules replayed on its logged steps.
"""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd

from dashboard import transforms
from monitor import alerts as rules
from monitor import schema

ALERT_COLUMNS = ("run", "kind", "layer", "step", "detail")


def find_alerts(table: pd.DataFrame, **limits) -> pd.DataFrame:
    """One row per alert (first step it happened), sorted by step, from a tidy table."""
    present = [str(m) for m in table["metric"].cat.categories] if len(table) else []
    bad = table[~np.isfinite(table["value"].to_numpy())] if len(table) else table
    return alerts_in(lambda *metrics: table[table["metric"].isin(metrics)], present, bad,
                     **limits)


#: the rules' limits (keyword arguments of :func:`alerts_in`; ``dashboard.explain`` draws them)
LIMITS = {"collapse_ratio": 0.5, "settle": 20, "sr_floor": 1.5, "sje_threshold": 0.8,
          "sje_steps": 3, "overhead_limit": 0.1}
LAYER_METRICS = (schema.STABLE_RANK, schema.SJE)  # the per-layer rules' metrics


def alerts_in(rows, present, nonfinite: pd.DataFrame, kept: dict | None = None,
              **limits) -> pd.DataFrame:
    """:func:`find_alerts` reading only what it needs: ``rows(*metrics)`` gives the tidy rows
    of some metrics, ``present`` names the metrics logged, ``nonfinite`` holds the NaN and
    infinite values of every metric (``RunReader.nonfinite_table`` notes them as they
    arrive). The app passes its per-metric tables: on a 27M-scalar run a table of
    everything costs seconds. ``kept``: ``{run: RunAlerts.update(its reader)}``, the rules
    kept up to date per run; what it lacks (None) is found here from ``rows``."""
    limits = {**LIMITS, **limits}
    kept = kept or {}
    todo = [m for m in LAYER_METRICS
            if not kept or any(k.get(m, ()) is None for k in kept.values())]
    out = [a for k in kept.values() for m in LAYER_METRICS if m not in todo
           for a in k.get(m, ())]
    for metric in todo:
        if metric not in present:
            continue
        for run, group in _by_run(rows(metric)):
            for layers, steps, values in transforms.layer_blocks(group):
                out.extend(layer_rule(metric, layers, limits).update(steps, values).alerts(run))
    out.extend(_nonfinite(rows(schema.TAG_NONFINITE_GRAD, schema.TAG_NONFINITE_WEIGHT)))
    out.extend(_nonfinite_values(nonfinite, rows))
    out.extend(_overhead(rows(schema.TAG_MONITOR_OVERHEAD), limits["overhead_limit"]))
    signals = {rule.signal for rule in rules.DEFAULT_RULES}
    out.extend(_rule_alerts(rows(*[m for m in present if m in signals or m.startswith("alert/")]),
                            {run: k.get(REPLAY) for run, k in kept.items()}))
    frame = pd.DataFrame(out, columns=list(ALERT_COLUMNS))
    return frame.sort_values(["step", "run", "kind"], kind="stable").reset_index(drop=True)


def layer_rule(metric: str, layers, limits: dict):
    """A fresh running state of ``metric``'s per-layer rule over ``layers``."""
    if metric == schema.STABLE_RANK:
        return Collapse(layers, limits["collapse_ratio"], limits["settle"], limits["sr_floor"])
    return SustainedSJE(layers, limits["sje_threshold"], limits["sje_steps"])


class Replayed:
    """The default rules of ``monitor.alerts`` (the job's own module) replayed on the logged
    steps, as a running computation: the engine (its moving averages and cooldowns) is
    carried, so new rows only extend it. ``tags[j]`` names column j of each update."""

    def __init__(self, tags=()) -> None:
        self.tags = list(tags)
        self.engine = rules.AlertEngine(rules.DEFAULT_RULES)
        self.found: list[rules.Alert] = []

    def update(self, steps: np.ndarray, values: np.ndarray) -> Replayed:
        return self.feed(zip(steps.tolist(), (dict(zip(self.tags, row)) for row in values.tolist())))

    def feed(self, steps) -> Replayed:
        """Extend with ``(step, {tag: value})`` pairs in increasing step order."""
        for step, values in steps:
            self.found.extend(self.engine.update(int(step), values))
        return self

    def alerts(self, run) -> list[tuple]:
        return [(run, f"rule {a.rule}", a.layer or "(all)", a.step,
                 f"replayed on the logged steps: {a.describe()}") for a in self.found]


REPLAY = "rules replayed"  # RunAlerts' key of the replayed rules


class RunAlerts:
    """One run's per-layer alerts and replayed rules, kept up to date from its reader's
    columns: each call feeds the running states (:class:`Collapse`, :class:`SustainedSJE`,
    :class:`Replayed`) only the rows logged since the last (``RunReader.layer_rows``), so a
    live refresh costs O(new rows) and gives what a full recompute gives. What is not laid
    out as the monitor writes it (a restart, several layouts) is left to the caller (the
    tidy tables, :func:`alerts_in`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, tuple] = {}  # key -> (position read to, limits, running state)

    def update(self, reader, **limits) -> dict[str, list[tuple] | None]:
        """``{metric or REPLAY: alerts}`` of ``reader`` (the per-layer rules on the metrics it
        logged, and the replayed rules); None where the caller must use the tidy table."""
        limits = {**LIMITS, **limits}
        logged = reader.metrics()
        signals = sorted({rule.signal for rule in rules.DEFAULT_RULES})
        with self._lock:
            states = {m: self._extend(reader, m, m, limits) for m in LAYER_METRICS if m in logged}
            states[REPLAY] = self._extend(reader, REPLAY, signals, None)
            return {key: None if state is None else state.alerts(reader.name)
                    for key, state in states.items()}

    def _extend(self, reader, key: str, metrics, limits: dict | None):
        position, known, state = self._states.get(key, (None, None, None))
        got = reader.layer_rows(metrics, position if known == limits else None)
        if got is None:
            self._states.pop(key, None)
            return None
        if got.fresh:
            state = Replayed(got.tags) if key == REPLAY else layer_rule(key, got.layers, limits)
        state.update(got.steps, got.values)
        self._states[key] = (got.position, limits, state)
        return state


def _by_run(table: pd.DataFrame):
    """``(run, rows)`` per run; one run is not split (a pandas group-by on millions of rows
    costs a fraction of a second)."""
    if not len(table):
        return
    runs = table["run"].cat.categories
    codes = table["run"].cat.codes.to_numpy()
    if len(runs) == 1 or (codes == codes[0]).all():
        yield runs[codes[0]], table
        return
    for run, group in table.groupby("run", observed=True):
        yield run, group


class Collapse:
    """The stable-rank collapse rule as a running computation over the logged steps of k
    layers (column j of each update is ``layers[j]``): per layer, the highest value so far
    (``peak``) and since the first ``settle`` rows (``settled``). Entry t of a layer hits when

        x_t < ratio * max(x_settle .. x_{t-1})   or   (x_t < floor and max(x_0 .. x_{t-1}) >= 2 floor)

    (non-finite values never hit, nor raise a peak). The first hit per layer is the alert.
    Rows may come in any number of updates: the result equals one update with all of them
    (the state carried is exact: maxima), so a live refresh costs O(new rows)."""

    def __init__(self, layers, ratio: float, settle: int, floor: float) -> None:
        self.layers, self.ratio, self.settle, self.floor = list(layers), ratio, settle, floor
        self.rows = 0
        self.peak = np.full(len(self.layers), -np.inf)
        self.settled = np.full(len(self.layers), -np.inf)
        self.first: dict[int, tuple] = {}  # layer index -> (step, value, peak) of its alert

    def update(self, steps: np.ndarray, values: np.ndarray) -> Collapse:
        """Extend with ``values`` (rows, layers) logged at ``steps`` (rows, layers) or (rows,)."""
        if not len(values):
            return self
        v = np.array(values.T, dtype=np.float64, order="C")  # (layers, rows), one pass per row
        v[~np.isfinite(v)] = -np.inf
        peak_any = _before(v, self.peak)
        counted = v.copy()  # values entering the settled peak: rows from `settle` on
        counted[:, :max(0, self.settle - self.rows)] = -np.inf
        threshold = _before(counted, self.settled)
        threshold *= self.ratio
        with np.errstate(invalid="ignore"):
            hit = (v > -np.inf) & ((v < threshold) | ((v < self.floor) & (peak_any >= 2 * self.floor)))
        first = hit.argmax(axis=1)
        for j in np.flatnonzero(hit.any(axis=1)):
            if j not in self.first:
                self.first[j] = (int(_column(steps, j)[first[j]]), v[j, first[j]],
                                 peak_any[j, first[j]])
        np.maximum(self.peak, v.max(axis=1), out=self.peak)
        np.maximum(self.settled, counted.max(axis=1), out=self.settled)
        self.rows += v.shape[1]
        return self

    def alerts(self, run) -> list[tuple]:
        return [(run, "stable rank collapse", self.layers[j], step,
                 f"stable rank {value:.3g}, down from a peak of {peak:.3g}")
                for j, (step, value, peak) in sorted(self.first.items())]


def _before(x: np.ndarray, carried: np.ndarray) -> np.ndarray:
    """Row-wise running maximum before each entry, starting from ``carried`` (the maximum of
    the entries before this block)."""
    out = np.empty_like(x)
    out[:, :1] = carried[:, None]
    if x.shape[1] > 1:
        np.maximum.accumulate(x[:, :-1], axis=1, out=out[:, 1:])
        np.maximum(out[:, 1:], carried[:, None], out=out[:, 1:])
    return out


def _column(steps: np.ndarray, j: int) -> np.ndarray:
    """Layer j's steps: ``steps`` is (rows,) (one step per row, all layers) or (rows, layers)."""
    return steps if steps.ndim == 1 else steps[:, j]


class SustainedSJE:
    """The SJE rule as a running computation over the logged steps of k layers: every run of
    ``min_steps`` or more consecutive rows with SJE above ``threshold``, per layer. The state
    carried is each layer's open run (first step, rows, maximum, last step), so updates in any
    number of pieces give the alerts of one update with all rows."""

    def __init__(self, layers, threshold: float, min_steps: int) -> None:
        self.layers, self.threshold, self.min_steps = list(layers), threshold, min_steps
        k = len(self.layers)
        self.open_rows = np.zeros(k, np.int64)  # rows of the run still open at the end (0: none)
        self.open_first = np.zeros(k, np.int64)  # its first step
        self.open_last = np.zeros(k, np.int64)  # its last step
        self.open_max = np.full(k, -np.inf)
        self.closed: list[tuple] = []  # (layer index, first, last, rows, max) of long ended runs

    def update(self, steps: np.ndarray, values: np.ndarray) -> SustainedSJE:
        """Extend with ``values`` (rows, layers) logged at ``steps`` (rows, layers) or (rows,)."""
        k, n = len(self.layers), len(values)
        above = np.zeros((n + 2, k), np.int8)  # row 0: a run open before; row n + 1: an end
        above[0] = self.open_rows > 0
        above[1:-1] = values > self.threshold
        edges = np.diff(above, axis=0).T  # (layers, n + 1): +1 at a run's first row, -1 after its last
        start_layer, starts = np.nonzero(edges == 1)  # row-major: by layer, then by step
        end_layer, ends = np.nonzero(edges == -1)
        carried = np.flatnonzero(self.open_rows)
        first_end = np.searchsorted(end_layer, carried)  # a carried run ends at its layer's first end
        for j, e in zip(carried, ends[first_end]):
            self._add(j, _column(steps, j)[:e], values[:e, j], closes=e < n)
        own = np.ones(len(ends), bool)
        own[first_end] = False
        ends = ends[own]  # now one end per start, in the same order
        for j, s, e in zip(start_layer, starts, ends):
            if e - s >= self.min_steps or e == n:  # short runs that ended: no state, no alert
                self.open_rows[j], self.open_max[j] = 0, -np.inf
                self.open_first[j] = _column(steps, j)[s]
                self._add(j, _column(steps, j)[s:e], values[s:e, j], closes=e < n)
        return self

    def _add(self, j: int, steps: np.ndarray, values: np.ndarray, closes: bool) -> None:
        """Extend layer j's open run with these rows; close it when ``closes``."""
        if len(steps):
            self.open_rows[j] += len(steps)
            self.open_last[j] = steps[-1]
            self.open_max[j] = max(self.open_max[j], values.max())
        if closes:
            if self.open_rows[j] >= self.min_steps:
                self.closed.append((j, int(self.open_first[j]), int(self.open_last[j]),
                                    int(self.open_rows[j]), float(self.open_max[j])))
            self.open_rows[j] = 0

    def alerts(self, run) -> list[tuple]:
        runs = self.closed + [(j, int(self.open_first[j]), int(self.open_last[j]),
                               int(self.open_rows[j]), float(self.open_max[j]))
                              for j in np.flatnonzero(self.open_rows)]
        return [(run, "SJE sustained", self.layers[j], first,
                 f"SJE above {self.threshold} for {rows} logged steps (steps {first}-{last}, "
                 f"max {peak:.3g})")
                for j, first, last, rows, peak in sorted(runs, key=lambda r: (r[0], r[1]))
                if rows >= self.min_steps]


def _nonfinite(table: pd.DataFrame) -> list[tuple]:
    out = []
    counts = table[table["metric"].isin([schema.TAG_NONFINITE_GRAD, schema.TAG_NONFINITE_WEIGHT])]
    bad = counts[counts["value"] != 0]
    for (run, metric), rows in bad.groupby(["run", "metric"], observed=True):
        first = rows.sort_values("step").iloc[0]
        what = "gradient" if metric == schema.TAG_NONFINITE_GRAD else "weight"
        out.append((run, "non-finite", "(all)", int(first["step"]),
                    f"{first['value']:.0f} non-finite {what} entries; {len(rows)} logged steps "
                    "with any"))
    return out


def _overhead(table: pd.DataFrame, limit: float) -> list[tuple]:
    out = []
    rows = table[table["metric"] == schema.TAG_MONITOR_OVERHEAD]
    for run, group in rows.groupby("run", observed=True):
        group = group.sort_values("step", kind="stable").iloc[1:]  # the first holds cold starts
        values = group["value"].to_numpy()
        if not len(values) or not np.nanmedian(values) > limit:
            continue
        first = int(group["step"].to_numpy()[np.argmax(values > limit)])
        out.append((run, "monitor overhead", "(all)", first,
                    f"the monitor took a median {np.nanmedian(values):.0%} of wall time "
                    f"(max {np.nanmax(values):.0%}) over {len(values)} logged steps: use "
                    "preset 'default' or 'cheap', a larger `every`, or a `layers` pattern"))
    return out


def _nonfinite_values(bad: pd.DataFrame, rows) -> list[tuple]:
    """NaN or inf metric values (``bad``), one alert per (run, metric, first step) naming
    the layers.

    ``update_ratio`` is NaN by definition where the weight norm is zero (biases initialised
    to zero): not an alert (``rows(param_norm)`` tells)."""
    if not len(bad):
        return []
    bad = bad[~_undefined_update_ratio(rows, bad)]
    firsts = (bad.sort_values("step", kind="stable")
              .groupby(["run", "metric", "layer"], observed=True, sort=False)
              .agg(step=("step", "first"), value=("value", "first"), n=("step", "size"))
              .reset_index())
    out = []
    for (run, metric, step), rows in firsts.groupby(["run", "metric", "step"], observed=True):
        layers = [name or "(global)" for name in rows["layer"]]
        others = "" if len(layers) == 1 else (
            f"; also in {len(layers) - 1} other layer(s): " + ", ".join(layers[1:4])
            + (" ..." if len(layers) > 4 else ""))
        value = rows["value"].iloc[0]
        out.append((run, "non-finite", layers[0], int(step),
                    f"{metric} is {value} ({int(rows['n'].iloc[0])} logged steps){others}"))
    return out


def _undefined_update_ratio(rows, bad: pd.DataFrame) -> np.ndarray:
    """Mask of ``bad`` rows that are NaN update ratios of weights with a zero norm."""
    mask = np.zeros(len(bad), bool)
    is_ratio = (bad["metric"] == schema.UPDATE_RATIO).to_numpy() & np.isnan(bad["value"].to_numpy())
    if not is_ratio.any():
        return mask
    norms = rows(schema.PARAM_NORM)
    zero = set(zip(norms["run"][norms["value"] == 0], norms["layer"][norms["value"] == 0],
                   norms["step"][norms["value"] == 0]))
    rows = bad[is_ratio]
    hits = [(r, l, s) in zero for r, l, s in zip(rows["run"], rows["layer"], rows["step"])]
    mask[np.flatnonzero(is_ratio)] = hits
    return mask


def _rule_alerts(table: pd.DataFrame, replayed: dict | None = None) -> list[tuple]:
    """The job's alert rules: firings it wrote (``alert/<rule>``), else the defaults replayed
    (``replayed[run]``: kept up to date by :class:`RunAlerts`; else replayed here)."""
    metrics = [str(m) for m in table["metric"].cat.categories] if len(table) else []
    written = [m for m in metrics if m.startswith("alert/") and m.split("/", 1)[1] not in rules.RESERVED]
    out = []
    for run, group in _by_run(table):
        fired = group[group["metric"].isin(written) & (group["value"] > 0)]
        for metric, step in zip(fired["metric"], fired["step"]):
            out.append((run, f"rule {metric.split('/', 1)[1]}", "(all)", int(step),
                        f"fired in the job (layer and value: text {schema.TAG_ALERT_EVENTS})"))
        if not len(fired):
            done = (replayed or {}).get(run)
            out.extend(done if done is not None else
                       Replayed().feed(_step_values(group, rules.DEFAULT_RULES)).alerts(run))
    return out


def _step_values(group: pd.DataFrame, rule_list) -> list[tuple[int, dict[str, float]]]:
    """``(step, {tag: value})`` in step order for the signals the rules read."""
    signals = {r.signal for r in rule_list}
    sub = group[group["metric"].isin(signals)]
    if not len(sub):
        return []
    layer = sub["layer"].astype(str)
    tags = np.where(layer == "", sub["metric"].astype(str), sub["metric"].astype(str) + "/" + layer)
    order = np.argsort(sub["step"].to_numpy(), kind="stable")
    steps = sub["step"].to_numpy()[order]
    tags, values = tags[order].tolist(), sub["value"].to_numpy()[order].tolist()
    unique, starts = np.unique(steps, return_index=True)  # split per step without pandas groups
    ends = list(starts[1:]) + [len(steps)]
    return [(int(step), dict(zip(tags[a:b], values[a:b])))
            for step, a, b in zip(unique, starts, ends)]
