"""Overview: the runs (state, progress, speed), alerts that lead to their layer, loss and
gradient norm with PSS interventions, what PSS did, and what the monitor said."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import cache, charts, explain, transforms, widgets
from dashboard.views import Context
from monitor import schema

MAX_ALERT_LINES = 8  # alerts spelled out above the table
ALERT_METRIC = {"stable rank collapse": "stable_rank", "SJE sustained": "sje"}
WINDOW = 30  # logged steps shown either side of an alert


def render(ctx: Context) -> None:
    st.subheader("Runs")
    # a static table: readable as text (and by a browser test), re-drawn on each refresh
    rows = pd.DataFrame(runs_rows(ctx)).set_index("run").astype(object)
    st.table(rows.where(rows.notna(), ""))  # blank, not "None", where a value is unknown
    if ctx.empty:
        return
    alerts_box = st.container()  # shown first, filled last: the alerts read whole metrics
    loss_section(ctx)  # (a second on a 27M-scalar run), the loss chart only two series
    events_section(ctx)
    monitor_messages(ctx)
    with alerts_box:
        alerts_section(ctx)


def runs_rows(ctx: Context) -> list[dict]:
    """One row per run: state, last step, steps/s and ETA (live runs), update age."""
    rows = []
    for run, reader in zip(ctx.runs, ctx.readers):
        steps, walls = reader.step_times()
        total = _total_steps(reader.table([schema.TAG_TOTAL_STEPS]))
        rate, eta = (transforms.speed(steps, walls, total) if run.status == "live"
                     else (None, None))
        rows.append({"run": run.name, "state": run.status,
                     "last step": int(steps.max()) if len(steps) else None,
                     "total steps": int(total) if total else None,
                     "steps/s": round(rate, 2) if rate else None,
                     "ETA": widgets.duration(eta) or None,
                     "layers": len(run.layers) or None, "updated": widgets.ago(run.updated)})
    return rows


def _total_steps(rows: pd.DataFrame) -> float | None:
    _, values = charts.series(rows, schema.TAG_TOTAL_STEPS)
    return float(values[-1]) if len(values) else None


def alerts_section(ctx: Context) -> None:
    found = cache.found_alerts(ctx.key, ctx.readers)
    st.subheader(f"Alerts ({len(found)})")
    if not len(found):
        st.success("No alerts: no stable-rank collapse, no sustained SJE above 0.8, no "
                   "non-finite values.")
        return
    lines = [f"- :red[**{a.kind}**] in run `{a.run}`, layer `{a.layer}`, step {a.step}: "
             f"{a.detail}" for a in found.head(MAX_ALERT_LINES).itertuples()]
    st.markdown("\n".join(lines))
    if len(found) > MAX_ALERT_LINES:
        st.caption(f"... and {len(found) - MAX_ALERT_LINES} more in the table below.")
    st.dataframe(found, hide_index=True, width="stretch")
    layered = found[found["kind"].isin(list(ALERT_METRIC))].reset_index(drop=True)
    if not len(layered):
        return
    labels = [f"{a.kind} · {a.layer} · step {a.step} · {a.run}" for a in layered.itertuples()]
    choice = st.selectbox("Show the layer of an alert", range(len(labels)),
                          format_func=lambda i: labels[i], key="alert_pick")
    alert_chart(ctx, layered.iloc[int(choice)])


def alert_chart(ctx: Context, alert: pd.Series) -> None:
    """The alerted layer's metric around the alert's step, with the alert threshold."""
    metric = ALERT_METRIC[alert["kind"]]
    rows = ctx.run_rows(str(alert["run"]), metric)
    rows = rows[rows["layer"] == alert["layer"]]
    steps = np.unique(rows["step"].to_numpy())
    i = int(np.searchsorted(steps, alert["step"]))
    lo, hi = steps[max(0, i - WINDOW)], steps[min(len(steps) - 1, i + WINDOW)]
    rows = rows[(rows["step"] >= lo) & (rows["step"] <= hi)]
    fig = charts.lines_figure(rows, metric, [str(alert["layer"])], style=ctx.style,
                              refs=explain.reference_lines(metric),
                              y_title=explain.unit(metric))
    fig.add_vline(x=int(alert["step"]), line=dict(color="#d62728", width=1))
    widgets.explain_metric(metric)
    widgets.chart(fig, "alert_layer", rows)


def loss_section(ctx: Context) -> None:
    present = set(ctx.metrics())
    if schema.TAG_LOSS in present or schema.TAG_GLOBAL_GRAD_NORM in present:
        fig = charts.overview_figure(ctx.rows(schema.TAG_LOSS, schema.TAG_GLOBAL_GRAD_NORM,
                                              schema.TAG_PSS_INTERVENTION), style=ctx.style)
        widgets.chart(fig, "overview", ctx.rows(schema.TAG_LOSS, schema.TAG_GLOBAL_GRAD_NORM))
    elif any(r.status == "live" for r in ctx.runs):
        st.info("No loss or gradient norm logged yet: they appear at the first logged step "
                "(the monitor logs every `every` optimizer steps).")
    else:
        st.info("These runs logged neither train/loss nor train/grad_norm (pass the loss with "
                "`mon.log(loss=...)`).")


def events_section(ctx: Context) -> None:
    """What PSS did: one row per smoothed layer of each intervention (``pss/events``)."""
    texts = pd.concat([r.texts() for r in ctx.readers], ignore_index=True)
    rows = transforms.pss_event_rows(texts, schema.TAG_PSS_EVENTS)
    if not len(rows):
        return
    st.subheader(f"What PSS did ({rows['step'].nunique()} events)")
    st.dataframe(rows, hide_index=True, width="stretch")


def monitor_messages(ctx: Context, last: int = 5) -> None:
    """What the monitor said: metrics that failed at a step, metrics a layer lacks."""
    notes = []
    for run, reader in zip(ctx.runs, ctx.readers):
        for step, text in widgets.texts_of(reader, schema.TAG_FAILURE_TEXT)[-last:]:
            notes.append(f"**{run.name}**, step {step}, failed metrics:\n{text}")
        for step, text in widgets.texts_of(reader, schema.TAG_UNSUPPORTED):
            notes.append(f"**{run.name}**, not computed: {text}")
    if notes:
        with st.expander(f"Messages from the monitor ({len(notes)})"):
            st.markdown("\n\n".join(notes))
