"""Layers: one metric as a layer x step heatmap (values, or relative to each layer's own
start or median, log colour) and as lines of the layers that alerted or moved most."""

from __future__ import annotations

import streamlit as st

from dashboard import cache, charts, explain, transforms, widgets
from dashboard.views import Context
from dashboard.views.overview import ALERT_METRIC


def render(ctx: Context) -> None:
    metrics = ctx.layer_metrics()
    if not metrics:
        st.info("No per-layer metrics logged yet in the selected runs.")
        return
    search = st.text_input("Search metrics and layers", key="layers_search",
                           help="a word matched in metric names and layer names: narrows the "
                                "metric list and the layers shown")
    hits = [m for m in metrics if search and search.lower() in m.lower()]
    left, mid, right = st.columns([2, 3, 1])
    metric = left.selectbox("Metric", hits or metrics, key="layers_metric")
    all_layers = charts.layer_order(ctx.layers(metric), cache.model_order(ctx.runs))
    with mid:
        layers, pattern, error = widgets.layer_pattern("Filter layers (regex)", "layers_filter",
                                                       all_layers)
    log = right.toggle("Log scale", value=metric in charts.LOG_METRICS, key=f"log_{metric}")
    widgets.explain_metric(metric)
    if error:
        st.error(error)
        return
    if search and not hits:
        layers = [name for name in layers if search.lower() in name.lower()]
    if not layers:
        st.warning(f"No layer logged {metric} matches {pattern or search!r}.")
        return
    heatmap(ctx, metric, layers, log)
    lines(ctx, metric, layers, log)


def heatmap(ctx: Context, metric: str, layers: list[str], log: bool) -> None:
    shown = layers[:charts.MAX_HEATMAP_LAYERS]
    names = [r.name for r in ctx.runs]
    run = st.selectbox("Heatmap of run", names, key="heat_run") if len(names) > 1 else names[0]
    scale = st.radio("Heatmap colour", transforms.HEAT_SCALES, key="heat_scale",
                     horizontal=True, help="relative: each layer divided by its own first or "
                     "median value, so a change shows whatever the layer's size (at init the "
                     "stable rank is 30-55, later 1-5)")
    steps, z = cache.heatmap(ctx.key + (run,), metric, tuple(shown), scale, ctx.reader(run))
    if len(shown) < len(layers):
        st.caption(f"Heatmap shows the first {len(shown)} of {len(layers)} matching layers; "
                   "narrow the filter to see the others.")
    title = f"{metric}: layer x step" + (f" · run {run}" if len(names) > 1 else "")
    widgets.chart(charts.heatmap_figure(shown, steps, z, metric, log, scale, title), "heatmap")


def lines(ctx: Context, metric: str, layers: list[str], log: bool) -> None:
    found = cache.found_alerts(ctx.key, ctx.readers)
    alerted = [str(x) for x in found[found["kind"].map(ALERT_METRIC) == metric]["layer"]]
    default = transforms.default_lines(alerted, cache.moved(ctx.key, metric, ctx.readers), layers)
    picked, _, error = widgets.layer_pattern(
        "Layers to draw as lines (regex)", f"lines_filter_{metric}", layers,
        default=widgets.exact_pattern(default))
    st.caption("Default: the layers that alerted on this metric, then those that moved most "
               "(|log(last / first)|).")
    if error:
        st.error(error)
        return
    if len(picked) > charts.MAX_LINES:
        st.caption(f"{len(picked)} layers match; the first {charts.MAX_LINES} are drawn.")
    table = ctx.rows(metric, layers=picked[:charts.MAX_LINES])  # the drawn layers' rows only
    fig = charts.lines_figure(table, metric, picked, log, style=ctx.style,
                              refs=explain.reference_lines(metric), y_title=explain.unit(metric))
    widgets.chart(fig, "lines", widgets.rows_of(table, metric, picked[:charts.MAX_LINES]))
