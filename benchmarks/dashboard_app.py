"""The dashboard measured through the app's own code path (shared by the dashboard benchmarks).

Two measurements of one run, each meant for a fresh process (its peak RSS is its own):

- :func:`chart_path`: what the Layers view runs for its first chart, without Streamlit:
  ``RunReader.refresh`` (every event read), ``RunReader.heatmap`` + ``charts.bin_columns``
  (what ``dashboard.cache.heatmap`` caches), the Plotly figure serialised to JSON as
  Streamlit sends it; then ``append()`` writes 10 more steps and the same is timed again
  (a live refresh: only the new records are read).
- :func:`app_path`: the app itself in Streamlit's ``AppTest`` on one view, cold caches:
  the time until its first chart was handed to Streamlit (``widgets.chart`` returned: its
  delta goes to the browser then, while the rest of the page is computed), and until the
  whole script run ended; then ``append()`` and a rerun (what a live refresh runs).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(ROOT, "dashboard", "app.py")


def rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ``ru_maxrss`` on Linux, it does
    not inherit the parent's peak from before ``exec``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def warm_up() -> None:
    """Plotly's first figure in a process pays its imports; the app's process has paid."""
    from dashboard import charts

    charts.heatmap_figure(["a"], np.arange(2), np.ones((1, 2)), "stable_rank").to_json()


def _heatmap_json(reader, metric: str, layers: list[str]) -> tuple[float, float]:
    from dashboard import charts, transforms

    t0 = time.perf_counter()
    steps, z = charts.bin_columns(*reader.heatmap(metric, layers))
    z = transforms.relative_rows(z, "value")
    t1 = time.perf_counter()
    charts.heatmap_figure(layers, steps, z, metric).to_json()
    return t1 - t0, time.perf_counter() - t1


def chart_path(run_dir: str, metric: str, append: Callable[[int], None]) -> dict:
    """Seconds of the first chart and of a refresh after 10 new steps, and peak RSS (MB)."""
    from dashboard import data

    warm_up()
    t0 = time.perf_counter()
    reader = data.RunReader(run_dir, "bench")
    reader.refresh()
    read = time.perf_counter() - t0
    layers = reader.layers(metric)
    heat, to_json = _heatmap_json(reader, metric, layers)
    out = {"read": read, "heatmap": heat, "json": to_json, "first": read + heat + to_json,
           "values": reader.n_values}
    append(int(reader.step_times()[0][-1]))
    t0 = time.perf_counter()
    new = reader.refresh()
    out["refresh_read"] = time.perf_counter() - t0
    heat, to_json = _heatmap_json(reader, metric, layers)
    out.update(refresh=out["refresh_read"] + heat + to_json, new_events=new, rss=rss_mb())
    return out


def app_path(logdir: str, view: str, append: Callable[[int], None]) -> dict:
    """The app on ``view``: seconds to its first chart and to the end of the script run,
    cold and after 10 new steps (``append(last step read)``; a rerun, as a live refresh),
    and peak RSS (MB)."""
    import streamlit as st
    from streamlit import config
    from streamlit.testing.v1 import AppTest

    from dashboard import widgets

    config.set_option("server.address", "127.0.0.1")  # what dashboard/.streamlit sets
    marks: list[float] = []
    chart = widgets.chart

    def timed_chart(*args, **kwargs):
        out = chart(*args, **kwargs)
        marks.append(time.perf_counter())
        return out

    widgets.chart = timed_chart  # the views call widgets.chart(...) at run time
    st.cache_resource.clear()  # cold: no reader has read the run yet
    st.cache_data.clear()
    warm_up()
    os.environ["MONITOR_LOGDIR"] = logdir
    at = AppTest.from_file(APP, default_timeout=600)
    at.session_state["view"] = view
    out = {}
    for name in ("first", "refresh"):
        if name == "refresh":
            from dashboard import cache

            readers = cache.run_store(os.path.realpath(logdir)).readers()
            append(max(int(r.step_times()[0][-1]) for r in readers))
        marks.clear()
        t0 = time.perf_counter()
        at.run()
        out[f"{name}_page"] = time.perf_counter() - t0
        out[f"{name}_chart"] = marks[0] - t0 if marks else float("nan")
        if at.exception:
            raise RuntimeError([e.value for e in at.exception])
    out["charts"] = len(at.get("plotly_chart"))
    out["rss"] = rss_mb()
    return out
