"""Widgets and messages shared by the views; helpers return plain values."""

from __future__ import annotations

import re
import time

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import charts, data, explain, png, transforms


def pick_runs(runs: list[data.RunInfo]) -> list[data.RunInfo]:
    """Multiselect of runs; the most recent one is selected from the start."""
    names = [r.name for r in runs]
    by_name = {r.name: r for r in runs}
    if "runs" in st.session_state:  # runs can vanish between reruns
        st.session_state["runs"] = [n for n in st.session_state["runs"] if n in by_name]
    else:  # first visit: the most recent run, with no click
        st.session_state["runs"] = names[:1]
    chosen = st.sidebar.multiselect(
        "Runs", names, key="runs",
        format_func=lambda n: f"{n} · {by_name[n].status}",
        help="Several runs are overlaid for comparison (e.g. PSS on against PSS off): one "
             "colour per run, one line style per layer.")
    return [by_name[n] for n in chosen]


def live_refresh(selected: list[data.RunInfo]) -> tuple[bool, float]:
    """The live-refresh toggle: on by default whenever the selection holds a live run,
    decided again each time the selection changes (not once per session)."""
    names = tuple(r.name for r in selected)
    if st.session_state.get("auto_for") != names:
        st.session_state["auto_for"] = names
        st.session_state["auto"] = any(r.status == "live" for r in selected)
    auto = st.sidebar.toggle("Live refresh", key="auto",
                             help="re-read new events periodically (only what was appended)")
    every = st.sidebar.number_input("every (s)", min_value=1, max_value=600, value=5,
                                    key="every", disabled=not auto)
    return auto, float(every)


def chart_style() -> charts.Style:
    """Sidebar options every line chart follows: x axis and smoothing."""
    with st.sidebar.expander("Chart options"):
        x = st.radio("x axis", transforms.X_AXES, key="x_axis", horizontal=True)
        smoothing = st.slider("smoothing (TensorBoard's EMA weight)", 0.0, 0.99, 0.0, 0.01,
                              key="smoothing", help="0: raw values; spikes stay visible "
                              "in the raw value, smoothing shows the trend")
    return charts.Style(x=x, smoothing=float(smoothing))


def layer_pattern(label: str, key: str, layers: list[str],
                  default: str = "") -> tuple[list[str], str, str | None]:
    """A regex text input over ``layers``: ``(the layers it matches, the pattern, an error
    message or None)``. The pattern is matched here, on the real names and under
    ``monitor.patterns``' time budget, so an invalid pattern or one that would backtrack
    for ever (``(a|aa)+$`` on a long name) gives a message instead of a stalled or broken
    page."""
    pattern = st.text_input(label, value=default, key=key,
                            help="Python regular expression, matched anywhere in the name")
    try:
        return charts.filter_layers(layers, pattern), pattern, None
    except re.error as err:  # monitor.patterns.PatternError is one
        return [], pattern, f"Invalid pattern {pattern!r}: {err}"


def exact_pattern(layers) -> str:
    """A regex matching exactly ``layers``."""
    return "^(" + "|".join(re.escape(name) for name in layers) + ")$" if layers else ""


def explain_metric(metric: str) -> None:
    found = explain.explain(metric)
    if found:
        st.caption(found.caption())


def chart(fig, key: str, rows: pd.DataFrame | None = None) -> None:
    """A Plotly chart with CSV export of its data and, with the optional ``kaleido``, a PNG
    rendered on the server (``dashboard.png``); the camera button of the chart's toolbar
    renders one in the browser either way."""
    st.plotly_chart(fig, width="stretch", key=key,
                    config={"toImageButtonOptions": {"format": "png", "filename": key,
                                                     "scale": 2}})
    has_rows = rows is not None and len(rows)
    if not (has_rows or png.AVAILABLE):
        return
    left, right, _ = st.columns([1, 1, 10])  # one row of export buttons under the chart
    if has_rows:  # deferred: the CSV is built only when clicked, not on every (live) rerun
        left.download_button("CSV", lambda: rows.to_csv(index=False).encode(),
                             file_name=f"{key}.csv", mime="text/csv", key=f"csv_{key}",
                             on_click="ignore",
                             help="the chart's data, one row per point (tidy: run, step, "
                                  "wall_time, metric, layer, value)")
    if png.AVAILABLE:  # deferred too: rendered only when clicked
        right.download_button("PNG", lambda: png.png_bytes(fig), file_name=f"{key}.png",
                              mime="image/png", key=f"png_{key}", on_click="ignore",
                              help="the chart as a PNG image (2x), rendered on the server")


def rows_of(table: pd.DataFrame, metric: str | None = None, layers=None) -> pd.DataFrame:
    """The tidy rows behind a chart (for CSV export)."""
    rows = table if metric is None else charts.metric_rows(table, metric)
    if layers is not None:
        rows = rows[rows["layer"].isin(list(layers))]
    return rows


def show_read_problems(runs: list[data.RunInfo], readers) -> None:
    for run, reader in zip(runs, readers):
        for err in reader.errors:
            st.error(f"Run **{run.name}**: {err}. Reading this file stopped there; the events "
                     "before it are shown.")
        if reader.pending_bytes and run.status != "live":
            st.warning(f"Run **{run.name}**: an event file ends with an incomplete record "
                       f"({reader.pending_bytes} bytes; the job was probably killed "
                       "mid-write). It is ignored; everything before it is shown.")
        if reader.n_files == 0:
            st.info(f"Run **{run.name}** has no events yet: waiting for its first logged step.")
        elif not reader.n_values and not reader.errors:
            st.info(f"Run **{run.name}** has no logged values yet.")


def ago(t: float) -> str:
    seconds = max(0.0, time.time() - t)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def duration(seconds: float | None) -> str:
    if seconds is None or not np.isfinite(seconds):
        return ""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def texts_of(reader: data.RunReader | None, tag: str) -> list[tuple[int, str]]:
    """(step, text) of one text tag of a run, in logged order."""
    if reader is None:
        return []
    texts = reader.texts()
    rows = texts[texts["tag"] == tag]
    return list(zip(rows["step"].tolist(), rows["text"].tolist()))
