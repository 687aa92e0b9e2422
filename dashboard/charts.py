"""Pure functions from tidy tables (``run, step, wall_time, metric, layer, value``) to figures.

Transforms (``series``, ``heatmap_matrix``, ``downsample``) return plain arrays, so the app
can cache them; ``*_figure`` functions turn them into Plotly figures. Long series are
downsampled to a bounded number of points keeping each bucket's minimum and maximum, so a
spike never disappears; heatmaps are binned to a bounded number of step columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboard import transforms
from monitor import patterns, schema

MAX_POINTS = 2000  # points per line after downsampling
MAX_HEATMAP_STEPS = 400  # step columns of a heatmap after binning
MAX_HEATMAP_LAYERS = 300  # rows of a heatmap; more are cut with a note
MAX_LINES = 12  # layers drawn as lines at once
LOG_METRICS = frozenset({schema.SIGMA_MAX, schema.GRAD_NORM, schema.PARAM_NORM, schema.UPDATE_RATIO,
                         schema.LR, schema.LR_EFFECTIVE, schema.TAG_GLOBAL_GRAD_NORM})
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
DASHES = ("solid", "dash", "dot", "dashdot")


# ---------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------


def metric_rows(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows of one metric (empty when absent); categorical comparison is vectorised."""
    if metric not in table["metric"].cat.categories:
        return table.iloc[:0]
    return table[table["metric"] == metric]


def series(table: pd.DataFrame, metric: str, layer: str = "",
           run: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Steps (sorted) and values of one metric of one layer ("" for global tags)."""
    rows = metric_rows(table, metric)
    mask = rows["layer"] == layer
    if run is not None:
        mask &= rows["run"] == run
    rows = rows[mask]
    steps = rows["step"].to_numpy()
    order = np.argsort(steps, kind="stable")
    return steps[order], rows["value"].to_numpy()[order]


def finite_or_nan(y: np.ndarray) -> np.ndarray:
    """Non-finite values become NaN: gaps in charts (the alerts report them instead)."""
    y = np.asarray(y, float)
    return np.where(np.isfinite(y), y, np.nan)


def downsample(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS
               ) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points: each bucket keeps its minimum and its maximum, so a
    spike survives; non-finite values become NaN (gaps)."""
    y = finite_or_nan(y)
    n = len(x)
    if n <= max_points:
        return x, y
    buckets = max_points // 2
    starts = np.linspace(0, n, buckets, endpoint=False).astype(np.int64)
    out_x = np.repeat(x[starts], 2)
    out_y = np.empty(2 * buckets)
    with np.errstate(invalid="ignore"):
        out_y[0::2] = np.fmin.reduceat(y, starts)  # fmin/fmax skip NaN
        out_y[1::2] = np.fmax.reduceat(y, starts)
    return out_x, out_y


def layer_order(present: Sequence[str], model_order: Sequence[str] = ()) -> list[str]:
    """Layers in model order (run.json), then any others in order of first appearance."""
    present_set = {p for p in present if p}
    ordered = [name for name in model_order if name in present_set]
    seen = set(ordered)
    ordered += [p for p in present if p and p not in seen]
    return ordered


def filter_layers(layers: Sequence[str], pattern: str) -> list[str]:
    """Layers whose name matches ``pattern`` (re.search semantics); raises re.error
    (``monitor.patterns.PatternError``) when it is invalid or too slow to match: a typed
    ``(a|aa)+$`` must not stall the page."""
    if not pattern:
        return list(layers)
    return patterns.select(pattern, layers)


def heatmap_matrix(table: pd.DataFrame, metric: str, layers: Sequence[str],
                   max_steps: int = MAX_HEATMAP_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, Z)`` with ``Z[i, j]`` the value of ``layers[i]`` at ``steps[j]`` (NaN: none).

    With more than ``max_steps`` logged steps, columns are binned (mean of each bin, the
    bin's first step as its label)."""
    rows = metric_rows(table, metric)
    row_of = {name: i for i, name in enumerate(layers)}
    cats = rows["layer"].cat.categories
    lookup = np.array([row_of.get(c, -1) for c in cats], np.int64)
    r = lookup[rows["layer"].cat.codes.to_numpy()] if len(cats) else np.empty(0, np.int64)
    keep = r >= 0
    r = r[keep]
    step_values = rows["step"].to_numpy()[keep]
    values = rows["value"].to_numpy()[keep]
    steps = np.unique(step_values)
    c = np.searchsorted(steps, step_values)
    z = np.full((len(layers), len(steps)), np.nan)
    z[r, c] = values
    return bin_columns(steps, z, max_steps)


def bin_columns(steps: np.ndarray, z: np.ndarray, max_steps: int = MAX_HEATMAP_STEPS
                ) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_steps`` columns: the mean of each bin's finite values (NaN where it
    has none), labelled by the bin's first step."""
    if len(steps) <= max_steps:
        return steps, z
    starts = np.linspace(0, len(steps), max_steps, endpoint=False).astype(np.int64)
    finite = np.isfinite(z)
    total = np.add.reduceat(np.where(finite, z, 0.0), starts, axis=1)
    count = np.add.reduceat(finite.astype(np.int64), starts, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return steps[starts], z


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Style:
    """How lines are drawn: the x axis (``transforms.X_AXES``) and TensorBoard smoothing."""

    x: str = "step"
    smoothing: float = 0.0


def xy(table: pd.DataFrame, metric: str, layer: str = "", run: str | None = None,
       style: Style = Style(), max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Downsampled, smoothed (x, y) of one series, x as ``style.x`` asks."""
    rows = metric_rows(table, metric)
    mask = rows["layer"] == layer
    if run is not None:
        mask &= rows["run"] == run
    rows = rows[mask]
    order = np.argsort(rows["step"].to_numpy(), kind="stable")
    steps = rows["step"].to_numpy()[order]
    values = rows["value"].to_numpy()[order]
    if style.x != "step":
        wall = rows["wall_time"].to_numpy()[order]
        start = _run_start(table, run)
        steps = transforms.x_values(steps, wall, style.x, start)
    x, y = downsample(steps, values, max_points)
    return x, transforms.ema_smooth(y, style.smoothing)


def _run_start(table: pd.DataFrame, run: str | None) -> float | None:
    rows = table if run is None else table[table["run"] == run]
    wall = rows["wall_time"].to_numpy()
    return float(wall.min()) if len(wall) else None


def line(x, y, name: str, color: str, dash: str = "solid", hover: str = "", width: float = 2,
         **kwargs) -> go.Scattergl:
    """A line trace; markers too when it has a single point (a line of one point is
    invisible and leaves an empty chart)."""
    mode = "lines+markers" if np.isfinite(np.asarray(y, float)).sum() <= 1 else "lines"
    return go.Scattergl(x=x, y=y, mode=mode, name=name, line=dict(color=color, dash=dash,
                                                                   width=width),
                        marker=dict(size=8, color=color),
                        hovertemplate=f"{hover or name}<br>%{{x}}: %{{y:.4g}}<extra></extra>",
                        **kwargs)


def log_axis(fig: go.Figure, **where) -> None:
    """A log y axis whose tick labels are whole numbers (0.5, 2e-3), not mantissas ("5")."""
    fig.update_yaxes(type="log", tickformat="~g", dtick="D2", exponentformat="e", **where)


def reference(fig: go.Figure, lines: Sequence[tuple[float, str]], **where) -> None:
    """Horizontal reference lines (alert thresholds), labelled at the right."""
    for y, label in lines:
        fig.add_hline(y=y, line=dict(color="#d62728", dash="dot", width=1),
                      annotation_text=label, annotation_position="top right",
                      annotation_font_size=10, **where)


def x_title(style: Style) -> str:
    return {"step": "optimizer step", "wall time": "wall time",
            "relative time (h)": "hours since the run started"}.get(style.x, style.x)


def frame(fig: go.Figure, title: str, height: int = 360) -> go.Figure:
    """Title, height, a small legend above the plot, full names in the hover."""
    fig.update_layout(title=dict(text=title, y=0.99, yanchor="top"), height=height,
                      margin=dict(l=10, r=10, t=90, b=10),
                      legend=dict(orientation="h", yanchor="bottom", y=1.04, x=0,
                                  font=dict(size=10), itemwidth=30),
                      hovermode="x unified", hoverlabel=dict(namelength=-1))
    return fig


def heatmap_figure(layers: Sequence[str], steps: np.ndarray, z: np.ndarray, metric: str,
                   log: bool = False, scale: str = "value", title: str | None = None
                   ) -> go.Figure:
    """Layer x step heatmap; layers top to bottom in model order; log10 colour when asked.

    ``scale`` names what ``z`` holds (a ``transforms.HEAT_SCALES`` entry) for the labels."""
    shown = finite_or_nan(z)
    label = {transforms.HEAT_SCALES[1]: f"{metric} / layer's first value",
             transforms.HEAT_SCALES[2]: f"{metric} / layer's median"}.get(scale, metric)
    if log:
        with np.errstate(invalid="ignore", divide="ignore"):
            shown = np.where(shown > 0, np.log10(np.where(shown > 0, shown, 1.0)), np.nan)
        label = f"log10 {label}"
    colorscale = "RdBu_r" if scale != "value" else "Viridis"
    mid = (0.0 if log else 1.0) if scale != "value" else None
    fig = go.Figure(go.Heatmap(z=shown, x=steps, y=list(layers), colorscale=colorscale,
                               zmid=mid, colorbar=dict(title=dict(text=label, side="right")),
                               hoverongaps=False,
                               hovertemplate="step %{x}<br>%{y}<br>" + label + " %{z:.4g}"
                                             "<extra></extra>"))
    if len(layers) <= 60:  # every name readable; beyond that, names are in the hover
        fig.update_yaxes(tickmode="array", tickvals=list(layers))
    fig.update_yaxes(autorange="reversed", showticklabels=len(layers) <= 60)
    height = int(min(1000, max(320, 20 * len(layers) + 150)))
    fig = frame(fig, title or f"{metric}: layer x step", height)
    fig.update_layout(hovermode="closest")
    fig.update_xaxes(title="optimizer step")
    return fig


def lines_figure(table: pd.DataFrame, metric: str, layers: Sequence[str], log: bool = False,
                 max_points: int = MAX_POINTS, style: Style = Style(),
                 refs: Sequence[tuple[float, str]] = (), y_title: str | None = None) -> go.Figure:
    """One line per (run, layer), at most MAX_LINES layers. One run: a colour per layer;
    several: a colour per run and a dash per layer, the run's full name in the hover."""
    fig = go.Figure()
    runs = list(table["run"].cat.categories) if len(table) else []
    rows = metric_rows(table, metric)
    for li, layer in enumerate(list(layers)[:MAX_LINES]):
        for ri, run in enumerate(runs):
            x, y = xy(rows, metric, layer, run if len(runs) > 1 else None, style, max_points)
            if not len(x):
                continue
            if len(runs) == 1:
                trace = line(x, y, layer, PALETTE[li % len(PALETTE)])
            else:
                trace = line(x, y, f"{_short(run)} · {layer}", PALETTE[ri % len(PALETTE)],
                             DASHES[li % len(DASHES)], hover=f"{run} · {layer}",
                             legendgroup=run)
            fig.add_trace(trace)
    if log:
        log_axis(fig)
    reference(fig, refs)
    fig.update_yaxes(title=y_title or metric)
    fig.update_xaxes(title=x_title(style))
    return frame(fig, f"{metric} per layer")


def _short(run: str, n: int = 24) -> str:
    return run if len(run) <= n else "…" + run[-(n - 1):]


def intervention_steps(table: pd.DataFrame, run: str | None = None) -> np.ndarray:
    """Steps where PSS smoothed (``pss/intervention`` > 0)."""
    x, y = series(table, schema.TAG_PSS_INTERVENTION, "", run)
    return x[y > 0]


def overview_figure(table: pd.DataFrame, max_points: int = MAX_POINTS,
                    style: Style = Style()) -> go.Figure:
    """Loss (top) and global gradient norm (bottom, log) per run; PSS interventions marked."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("loss", "global gradient norm"))
    runs = list(table["run"].cat.categories) if len(table) else []
    for ri, run in enumerate(runs):
        color = PALETTE[ri % len(PALETTE)]
        for row, tag in ((1, schema.TAG_LOSS), (2, schema.TAG_GLOBAL_GRAD_NORM)):
            x, y = xy(table, tag, "", run, style, max_points)
            if len(x):
                fig.add_trace(line(x, y, _short(run), color, hover=f"{run} · {tag}",
                                   legendgroup=run, showlegend=row == 1), row=row, col=1)
        hits = intervention_steps(table, run)
        if len(hits):
            gx, gy = series(table, schema.TAG_GLOBAL_GRAD_NORM, "", run)
            gy_at = np.interp(hits, gx, gy) if len(gx) else np.ones(len(hits))
            hx, hv = xy(table, schema.TAG_PSS_INTERVENTION, "", run, Style(x=style.x), 10**9)
            fig.add_trace(go.Scatter(x=hx[hv > 0], y=gy_at, mode="markers", legendgroup=run,
                                     name=f"PSS intervention [{_short(run)}]",
                                     marker=dict(symbol="x", size=10, color="#d62728")),
                          row=2, col=1)
    log_axis(fig, row=2, col=1)
    fig.update_yaxes(title="loss (nats)", row=1, col=1)
    fig.update_yaxes(title="||g|| (all parameters)", row=2, col=1)
    fig.update_xaxes(title=x_title(style), row=2, col=1)
    return frame(fig, "loss and gradient norm", height=520)


def lr_figure(table: pd.DataFrame, layers: Sequence[str], max_points: int = MAX_POINTS,
              style: Style = Style()) -> go.Figure:
    """Applied learning rate (solid) and measured effective rate (dotted) per layer, log y.
    Several runs: a colour per run, the layer in the name and hover."""
    fig = go.Figure()
    runs = list(table["run"].cat.categories) if len(table) else []
    for li, layer in enumerate(list(layers)[:MAX_LINES]):
        for ri, run in enumerate(runs):
            color = PALETTE[(li if len(runs) == 1 else ri) % len(PALETTE)]
            prefix = "" if len(runs) == 1 else f"{_short(run)} · "
            for metric, dash, label in ((schema.LR, "solid", "applied"),
                                        (schema.LR_EFFECTIVE, "dot", "effective")):
                x, y = xy(table, metric, layer, run, style, max_points)
                if len(x):
                    fig.add_trace(line(x, y, f"{prefix}{layer} {label}", color, dash,
                                       hover=f"{run} · {layer} {label}"))
    log_axis(fig)
    fig.update_yaxes(title="learning rate (per step)")
    fig.update_xaxes(title=x_title(style))
    return frame(fig, "applied (solid) and effective (dotted) learning rate", height=420)
