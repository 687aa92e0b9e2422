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

from monitor import alerts as rules
from monitor import schema

ALERT_COLUMNS = ("run", "kind", "layer", "step", "detail")


def find_alerts(table: pd.DataFrame, *, collapse_ratio: float = 0.5, settle: int = 20,
                sr_floor: float = 1.5, sje_threshold: float = 0.8, sje_steps: int = 3,
                overhead_limit: float = 0.1) -> pd.DataFrame:
    """One row per alert (first step it happened), sorted by step."""
    rows: list[tuple] = []
    if len(table):
        for (run, metric), group in _groups(table, (schema.STABLE_RANK, schema.SJE)):
            for layer, steps, values in _per_layer(group):
                if metric == schema.STABLE_RANK:
                    rows.extend(_collapse(run, layer, steps, values, collapse_ratio, settle,
                                         sr_floor))
                else:
                    rows.extend(_sje(run, layer, steps, values, sje_threshold, sje_steps))
        rows.extend(_nonfinite(table))
        rows.extend(_overhead(table, overhead_limit))
        rows.extend(_rule_alerts(table))
    frame = pd.DataFrame(rows, columns=list(ALERT_COLUMNS))
    return frame.sort_values(["step", "run", "kind"], kind="stable").reset_index(drop=True)


def input_metrics(present) -> list[str]:
    """The metrics of ``present`` that :func:`find_alerts` reads: stable rank, SJE, the
    hook's non-finite counts and overhead, the job's firings (``alert/*``) and the default
    rules' signals. (NaN and infinite values of the other metrics it also reads come with
    them: ``dashboard.data.RunReader.alert_table``.)"""
    wanted = {schema.STABLE_RANK, schema.SJE, schema.TAG_NONFINITE_GRAD,
              schema.TAG_NONFINITE_WEIGHT, schema.TAG_MONITOR_OVERHEAD}
    wanted |= {rule.signal for rule in rules.DEFAULT_RULES}
    return [m for m in present if m in wanted or m.startswith("alert/")]


def _groups(table: pd.DataFrame, metrics):
    present = set(table["metric"].cat.categories)
    for metric in metrics:
        if metric not in present:
            continue
        sub = table[table["metric"] == metric]
        for run, group in sub.groupby("run", observed=True):
            yield (run, metric), group


def _per_layer(group: pd.DataFrame):
    for layer, rows in group.groupby("layer", observed=True):
        steps = rows["step"].to_numpy()
        order = np.argsort(steps, kind="stable")
        yield layer, steps[order], rows["value"].to_numpy()[order]


def _collapse(run, layer, steps, values, ratio, settle, floor):
    finite = np.where(np.isfinite(values), values, -np.inf)
    settled = np.where(np.arange(len(values)) >= settle, finite, -np.inf)
    peak_settled = np.maximum.accumulate(np.concatenate([[-np.inf], settled[:-1]]))
    peak_any = np.maximum.accumulate(np.concatenate([[-np.inf], finite[:-1]]))
    with np.errstate(invalid="ignore"):
        drop = np.isfinite(values) & (values < ratio * peak_settled)
        near_one = np.isfinite(values) & (values < floor) & (peak_any >= 2 * floor)
    hit = np.flatnonzero(drop | near_one)
    if not len(hit):
        return []
    i = hit[0]
    return [(run, "stable rank collapse", layer, int(steps[i]),
             f"stable rank {values[i]:.3g}, down from a peak of {peak_any[i]:.3g}")]


def _sje(run, layer, steps, values, threshold, min_steps):
    above = np.concatenate([[False], values > threshold, [False]]).astype(np.int8)
    edges = np.diff(above)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    out = []
    for s, e in zip(starts, ends):
        if e - s >= min_steps:
            out.append((run, "SJE sustained", layer, int(steps[s]),
                        f"SJE above {threshold} for {e - s} logged steps "
                        f"(steps {int(steps[s])}-{int(steps[e - 1])}, max {values[s:e].max():.3g})"))
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
    out.extend(_nonfinite_values(table))
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


def _nonfinite_values(table: pd.DataFrame) -> list[tuple]:
    """NaN or inf metric values, one alert per (run, metric, first step) naming the layers.

    ``update_ratio`` is NaN by definition where the weight norm is zero (biases initialised
    to zero): not an alert."""
    bad = table[~np.isfinite(table["value"].to_numpy())]
    if not len(bad):
        return []
    bad = bad[~_undefined_update_ratio(table, bad)]
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


def _undefined_update_ratio(table: pd.DataFrame, bad: pd.DataFrame) -> np.ndarray:
    """Mask of ``bad`` rows that are NaN update ratios of weights with a zero norm."""
    mask = np.zeros(len(bad), bool)
    is_ratio = (bad["metric"] == schema.UPDATE_RATIO).to_numpy() & np.isnan(bad["value"].to_numpy())
    if not is_ratio.any() or schema.PARAM_NORM not in table["metric"].cat.categories:
        return mask
    norms = table[table["metric"] == schema.PARAM_NORM]
    zero = set(zip(norms["run"][norms["value"] == 0], norms["layer"][norms["value"] == 0],
                   norms["step"][norms["value"] == 0]))
    rows = bad[is_ratio]
    hits = [(r, l, s) in zero for r, l, s in zip(rows["run"], rows["layer"], rows["step"])]
    mask[np.flatnonzero(is_ratio)] = hits
    return mask


def _rule_alerts(table: pd.DataFrame) -> list[tuple]:
    """The job's alert rules: firings it wrote (``alert/<rule>``), else the defaults replayed."""
    metrics = [str(m) for m in table["metric"].cat.categories]
    written = [m for m in metrics if m.startswith("alert/") and m.split("/", 1)[1] not in rules.RESERVED]
    out = []
    for run, group in table.groupby("run", observed=True):
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
    frame = pd.DataFrame({"step": sub["step"].to_numpy(), "tag": tags, "value": sub["value"].to_numpy()})
    return [(int(step), dict(zip(rows["tag"], rows["value"])))
            for step, rows in frame.sort_values("step", kind="stable").groupby("step", sort=True)]
