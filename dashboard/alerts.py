"""Alerts a user should not miss, found in a tidy table; each names its run, layer and step.

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


def alerts_in(rows, present, nonfinite: pd.DataFrame, *, collapse_ratio: float = 0.5,
              settle: int = 20, sr_floor: float = 1.5, sje_threshold: float = 0.8,
              sje_steps: int = 3, overhead_limit: float = 0.1) -> pd.DataFrame:
    """:func:`find_alerts` reading only what it needs: ``rows(*metrics)`` gives the tidy rows
    of some metrics, ``present`` names the metrics logged, ``nonfinite`` holds the NaN and
    infinite values of every metric (``RunReader.nonfinite_table`` notes them as they
    arrive). The app passes its per-metric tables: on a 27M-scalar run a table of
    everything costs seconds."""
    out: list[tuple] = []
    for metric in (schema.STABLE_RANK, schema.SJE):
        if metric not in present:
            continue
        for run, group in _by_run(rows(metric)):
            for layers, steps, values in transforms.layer_blocks(group):
                if metric == schema.STABLE_RANK:
                    out.extend(_collapse(run, layers, steps, values, collapse_ratio, settle,
                                         sr_floor))
                else:
                    out.extend(_sje(run, layers, steps, values, sje_threshold, sje_steps))
    out.extend(_nonfinite(rows(schema.TAG_NONFINITE_GRAD, schema.TAG_NONFINITE_WEIGHT)))
    out.extend(_nonfinite_values(nonfinite, rows))
    out.extend(_overhead(rows(schema.TAG_MONITOR_OVERHEAD), overhead_limit))
    signals = {rule.signal for rule in rules.DEFAULT_RULES}
    out.extend(_rule_alerts(rows(*[m for m in present if m in signals or m.startswith("alert/")])))
    frame = pd.DataFrame(out, columns=list(ALERT_COLUMNS))
    return frame.sort_values(["step", "run", "kind"], kind="stable").reset_index(drop=True)


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


def _collapse(run, layers, steps, values, ratio, settle, floor):
    """The first collapse of each layer; column j of ``steps``/``values`` is ``layers[j]``
    (all layers at once, one layer per contiguous row: a 300 x 10,000 run in a few passes,
    in place where it can: fresh arrays of this size cost as much as the arithmetic)."""
    v = np.array(values.T, order="C")  # (layers, steps); non-finite values never hit
    v[~np.isfinite(v)] = -np.inf  # ... nor raise a peak
    peak_any = _before(v, 0)  # highest value before each step
    threshold = _before(v, settle)  # highest value since the first `settle` steps, before it
    threshold *= ratio
    with np.errstate(invalid="ignore"):
        hit = (v > -np.inf) & ((v < threshold) | ((v < floor) & (peak_any >= 2 * floor)))
    first = hit.argmax(axis=1)
    return [(run, "stable rank collapse", layers[j], int(steps[first[j], j]),
             f"stable rank {v[j, first[j]]:.3g}, down from a peak of {peak_any[j, first[j]]:.3g}")
            for j in np.flatnonzero(hit.any(axis=1))]


def _before(x: np.ndarray, start: int) -> np.ndarray:
    """Row-wise running maximum of the entries from column ``start`` on, before each entry
    (-inf where there is none)."""
    out = np.full_like(x, -np.inf)
    if x.shape[1] > start + 1:
        np.maximum.accumulate(x[:, start:-1], axis=1, out=out[:, start + 1:])
    return out


def _sje(run, layers, steps, values, threshold, min_steps):
    """Each run of ``min_steps`` or more logged steps with SJE above ``threshold``, per layer
    (column j is ``layers[j]``)."""
    edge = np.zeros((1, values.shape[1]), np.int8)
    above = np.vstack([edge, values > threshold, edge]).astype(np.int8)
    edges = np.diff(above, axis=0).T  # (layers, rows + 1): +1 where a run starts, -1 ends
    start_layer, starts = np.nonzero(edges == 1)  # row-major: by layer, then by step
    _, ends = np.nonzero(edges == -1)
    out = []
    for j, s, e in zip(start_layer, starts, ends):
        if e - s >= min_steps:
            col = steps[:, j]
            out.append((run, "SJE sustained", layers[j], int(col[s]),
                        f"SJE above {threshold} for {e - s} logged steps "
                        f"(steps {int(col[s])}-{int(col[e - 1])}, max "
                        f"{values[s:e, j].max():.3g})"))
    return out


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


def _rule_alerts(table: pd.DataFrame) -> list[tuple]:
    """The job's alert rules: firings it wrote (``alert/<rule>``), else the defaults replayed."""
    metrics = [str(m) for m in table["metric"].cat.categories] if len(table) else []
    written = [m for m in metrics if m.startswith("alert/") and m.split("/", 1)[1] not in rules.RESERVED]
    out = []
    for run, group in _by_run(table):
        fired = group[group["metric"].isin(written) & (group["value"] > 0)]
        for metric, step in zip(fired["metric"], fired["step"]):
            out.append((run, f"rule {metric.split('/', 1)[1]}", "(all)", int(step),
                        f"fired in the job (layer and value: text {schema.TAG_ALERT_EVENTS})"))
        if not len(fired):
            for alert in rules.replay(_step_values(group, rules.DEFAULT_RULES), rules.DEFAULT_RULES):
                out.append((run, f"rule {alert.rule}", alert.layer or "(all)", alert.step,
                            f"replayed on the logged steps: {alert.describe()}"))
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
