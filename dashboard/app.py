"""The dashboard: every layer's stability live, and PSS steered from the browser.

    streamlit run dashboard/app.py -- --logdir runs    # from the repository
    stability-dashboard --logdir runs                  # installed (dashboard.cli): the same

The log directory comes from ``--logdir``, else the environment variable ``MONITOR_LOGDIR``,
else ``./runs``. The app binds to 127.0.0.1 from any working directory
(``dashboard/.streamlit/config.toml``, read next to this file); to reach it from another
machine pass ``--server.address 0.0.0.0`` (anyone who can reach the port can then change the
PSS settings of your runs: prefer an SSH tunnel). Started listening on every interface
without asking, it shows nothing but how to restart it (``dashboard.bind.guard``).

Data flow: cached readers (``dashboard.cache`` over ``dashboard.data``, one per run, reading
only new events) -> cached transforms (``dashboard.charts``, ``transforms``, ``alerts``) ->
render, one module per view in ``dashboard/views/``. This file holds the arguments, the
sidebar and the routing. The only file the app writes is ``control.json`` of the selected
run (``views/pss.py``, through ``monitor.schema.write_control``), in a directory checked to
lie inside the log directory.
"""

from __future__ import annotations

import argparse
import os
import sys

import streamlit as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `streamlit run dashboard/app.py` puts only dashboard/ on the path
    sys.path.insert(0, ROOT)

from dashboard import bind, cache, data, widgets  # noqa: E402
from dashboard.views import Context, config, layers, learning_rates, overview, pss  # noqa: E402

VIEWS = {"Overview": overview, "Layers": layers, "Learning rates": learning_rates,
         "PSS control": pss, "Run config": config}


def logdir_setting(argv: list[str] | None = None) -> str:
    """``--logdir`` after ``--`` on the command line, else $MONITOR_LOGDIR, else ./runs."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--logdir", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return args.logdir or os.environ.get("MONITOR_LOGDIR") or "runs"


bind.guard(logdir_setting())  # before anything is shown: never on every interface by accident


def render_view(view: str, logdir: str, names: tuple[str, ...], style, live: bool) -> None:
    """One view of the runs called ``names``, discovered again on every call: under live
    refresh this runs as a fragment, and the runs' state and age must move with it."""
    runs = cache.fresh_runs(logdir, names)
    if not runs:
        st.info("The selected runs are gone from the log directory.")
        return
    key, readers = cache.load(logdir, runs)
    widgets.show_read_problems(runs, readers)
    VIEWS[view].render(Context(logdir, runs, key, readers, style, live))


def wait_for_runs(logdir: str) -> None:
    """Polled while the log directory is empty: reload the page when a run appears."""
    if data.discover_runs(logdir):
        st.rerun()


def main() -> None:
    st.set_page_config(page_title="Training stability", layout="wide")
    logdir = logdir_setting()
    st.sidebar.title("Training stability")
    st.sidebar.caption(f"log directory: `{os.path.abspath(logdir)}`")
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        st.error(f"The log directory `{os.path.abspath(logdir)}` is a file, not a directory: "
                 "pass the directory that holds the runs (`-- --logdir PATH` or MONITOR_LOGDIR).")
        return
    if not os.path.isdir(logdir):
        st.warning(f"The log directory `{os.path.abspath(logdir)}` does not exist (yet). Start "
                   "a training with `monitor.watch(model, optimizer, logdir=...)` under it, or "
                   "pass `-- --logdir PATH` (or set MONITOR_LOGDIR); this page opens the first "
                   "run that appears.")
        st.fragment(wait_for_runs, run_every=2.0)(logdir)
        return
    runs = data.discover_runs(logdir)
    if not runs:
        st.info(f"No runs under `{os.path.abspath(logdir)}` yet. A run is a directory with "
                "event files written by `monitor.watch(...)`; this page opens it as soon as "
                "it appears.")
        st.fragment(wait_for_runs, run_every=2.0)(logdir)
        return
    selected = widgets.pick_runs(runs)
    view = st.sidebar.radio("View", list(VIEWS), key="view")
    auto, every = widgets.live_refresh(selected)
    style = widgets.chart_style()
    if not selected:
        st.info("Select at least one run in the sidebar.")
        return
    names = tuple(r.name for r in selected)
    if auto and view != "PSS control":  # the form must not re-run under the user's fingers
        st.fragment(render_view, run_every=every)(view, logdir, names, style, True)
    else:
        render_view(view, logdir, names, style, False)


main()
