"""Pure transforms behind the reading aids: smoothing, x axes, relative heatmaps, ranking
layers by movement, PSS event texts as rows, and a live run's speed.

Everything here maps arrays or tidy tables (``run, step, wall_time, metric, layer, value``)
to arrays or small tables, so the app can cache it and tests can check it by hand.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

X_AXES = ("step", "wall time", "relative time (h)")
HEAT_SCALES = ("value", "relative to the layer's first value", "relative to the layer's median")


def ema_smooth(y: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: a debiased exponential moving average, NaN skipped.

        s_t = w s_{t-1} + (1 - w) y_t,   shown: s_t / (1 - w^n_t)

    with ``n_t`` the finite values seen so far; ``weight`` 0 returns ``y`` unchanged."""
    y = np.asarray(y, float)
    if weight <= 0 or not len(y):
        return y
    out = np.full(len(y), np.nan)
    last, n = 0.0, 0
    for i, v in enumerate(y):  # sequential by nature; a few thousand points after downsampling
        if np.isfinite(v):
            last = weight * last + (1 - weight) * v
            n += 1
            out[i] = last / (1 - weight ** n)
        elif n:
            out[i] = np.nan
    return out


def x_values(steps: np.ndarray, wall: np.ndarray, axis: str, start: float | None = None
             ) -> np.ndarray:
    """The x coordinates for ``axis`` (one of X_AXES): steps, datetimes, or hours since
    ``start`` (the run's first wall time)."""
    if axis == "wall time":
        return pd.to_datetime(np.asarray(wall, float), unit="s").to_numpy()
    if axis == "relative time (h)":
        wall = np.asarray(wall, float)
        origin = start if start is not None else (wall.min() if len(wall) else 0.0)
        return (wall - origin) / 3600.0
    return np.asarray(steps)


def relative_rows(z: np.ndarray, scale: str) -> np.ndarray:
    """Each heatmap row divided by its own first finite value or median (``HEAT_SCALES``),
    so a change shows however large the layer's starting value was."""
    z = np.asarray(z, float)
    if scale == HEAT_SCALES[0] or not z.size:
        return z
    finite = np.where(np.isfinite(z), z, np.nan)
    if scale == HEAT_SCALES[1]:
        has = np.isfinite(finite)
        first_col = np.where(has.any(axis=1), has.argmax(axis=1), 0)
        base = finite[np.arange(len(z)), first_col]
    else:
        with np.errstate(all="ignore"):
            base = np.nanmedian(finite, axis=1) if np.isfinite(finite).any() else np.full(len(z), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        return finite / np.where(base != 0, base, np.nan)[:, None]


def movement(table: pd.DataFrame, metric: str) -> pd.Series:
    """Per layer, how far the metric moved: |log(last / first)| for positive values, else
    |last - first| over the spread; largest first. First and last: of the non-NaN values
    in step order."""
    rows = table[table["metric"] == metric] if metric in table["metric"].cat.categories else table.iloc[:0]
    names, first, last = [], [], []
    for layer, _, values in per_layer(rows):
        if layer == "":
            continue
        known = values[~np.isnan(values)]
        names.append(str(layer))
        first.append(known[0] if len(known) else np.nan)
        last.append(known[-1] if len(known) else np.nan)
    if not names:
        return pd.Series(dtype=float)
    first, last = np.asarray(first), np.asarray(last)
    with np.errstate(all="ignore"):
        positive = (first > 0) & (last > 0)
        score = np.where(positive, np.abs(np.log(np.where(positive, last, 1) / np.where(positive, first, 1))),
                         np.abs(last - first) / (np.abs(first) + 1e-12))
    out = pd.Series(score, index=names).replace([np.inf, -np.inf], np.nan)
    return out.fillna(0).sort_values(ascending=False, kind="stable")


def per_layer(group: pd.DataFrame):
    """``(layer, steps, values)`` per layer, steps sorted (stable: a step logged twice keeps
    its order)."""
    for names, steps, values in layer_blocks(group):
        for j, name in enumerate(names):
            yield name, steps[:, j], values[:, j]


def layer_blocks(group: pd.DataFrame):
    """``(layers, steps, values)`` with ``steps`` and ``values`` of shape (rows, len(layers)):
    column j is layer j's series, steps sorted. Rows in the monitor's layout (every event:
    the same k layers in the same order, steps increasing) make one block of k columns, by a
    reshape, so per-layer work can be vectorised; others one block per layer, after one sort
    on the layer code (a per-group pandas split costs seconds on a 300-layer, 10,000-step
    run)."""
    codes = group["layer"].cat.codes.to_numpy()
    steps, values = group["step"].to_numpy(), group["value"].to_numpy()
    names = group["layer"].cat.categories
    periodic = _period(codes)
    if periodic:
        grid = steps.reshape(-1, periodic)
        if (np.diff(grid, axis=0) > 0).all():  # each layer's steps increasing
            yield [names[c] for c in codes[:periodic]], grid, values.reshape(-1, periodic)
            return
    by_layer = np.argsort(codes, kind="stable")
    codes, steps, values = codes[by_layer], steps[by_layer], values[by_layer]
    firsts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if len(codes) else []
    for a, b in zip(firsts, list(firsts[1:]) + [len(codes)]):
        s, v = steps[a:b], values[a:b]
        if len(s) > 1 and (np.diff(s) < 0).any():
            order = np.argsort(s, kind="stable")
            s, v = s[order], v[order]
        yield [names[codes[a]]], s[:, None], v[:, None]


def _period(codes: np.ndarray) -> int:
    """k when ``codes`` repeats its first k distinct values (k > 1 rows), else 0."""
    if len(codes) < 2:
        return 0
    again = np.flatnonzero(codes[1:] == codes[0])
    k = int(again[0]) + 1 if len(again) else len(codes)
    if len(codes) % k or len(np.unique(codes[:k])) != k:
        return 0
    return k if (codes.reshape(-1, k) == codes[:k]).all() else 0


def default_lines(alerted: Sequence[str], moved: Sequence[str], present: Sequence[str],
                  n: int = 4) -> list[str]:
    """The layers drawn by default: those that alerted, then those that moved most."""
    have = set(present)
    out: list[str] = []
    for name in list(alerted) + list(moved) + list(present):
        if name in have and name not in out:
            out.append(name)
        if len(out) == n:
            break
    return out


_EVENT_HEAD = re.compile(r"^step (\d+): (intervention|[^\n]*)")
_REASON = re.compile(r"intervention \((.*)\); method (\w+); (\d+) layer\(s\) in (\d+) ms")
_LAYER = re.compile(r"^- (\S+): k=(\d+), sigma ([^ ]+) -> ([^,]+), SR ([^ ]+) -> (\S+)")


def pss_event_rows(texts: pd.DataFrame, tag: str) -> pd.DataFrame:
    """The ``pss/events`` texts as one row per smoothed layer: step, reason, method,
    layer, k, sigma and SR before and after (events without layers keep one row)."""
    rows = []
    sel = texts[texts["tag"] == tag] if len(texts) else texts
    for run, step, text in zip(sel.get("run", []), sel.get("step", []), sel.get("text", [])):
        lines = str(text).splitlines()
        head = lines[0] if lines else ""
        found = _REASON.search(head)
        base = {"run": run, "step": int(step),
                "reason": found.group(1) if found else re.sub(r"^step \d+: ", "", head),
                "method": found.group(2) if found else ""}
        layers = [m for m in (_LAYER.match(line) for line in lines[1:]) if m]
        if not layers:
            rows.append({**base, "layer": "", "k": None, "sigma before": None,
                         "sigma after": None, "SR before": None, "SR after": None})
        for m in layers:
            rows.append({**base, "layer": m.group(1), "k": int(m.group(2)),
                         "sigma before": float(m.group(3)), "sigma after": float(m.group(4)),
                         "SR before": float(m.group(5)), "SR after": float(m.group(6))})
    return pd.DataFrame(rows, columns=["run", "step", "reason", "method", "layer", "k",
                                       "sigma before", "sigma after", "SR before", "SR after"])


def strip_step(text: str) -> str:
    """A job's message without its leading ``step N:`` (the app shows the step itself)."""
    return re.sub(r"^step \d+:\s*", "", str(text))


def speed(steps: np.ndarray, wall: np.ndarray, total: float | None = None,
          window: int = 20) -> tuple[float | None, float | None]:
    """(steps per second over the last ``window`` logged steps, seconds left to ``total``)."""
    steps, wall = np.asarray(steps, float), np.asarray(wall, float)
    if len(steps) < 2:
        return None, None
    order = np.argsort(steps, kind="stable")
    steps, wall = steps[order][-window:], wall[order][-window:]
    dt, ds = wall[-1] - wall[0], steps[-1] - steps[0]
    if dt <= 0 or ds <= 0:
        return None, None
    rate = ds / dt
    eta = (total - steps[-1]) / rate if total and total > steps[-1] else None
    return rate, eta
