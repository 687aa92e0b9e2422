"""The dashboard: every layer's stability live, and PSS steered from the browser.

    streamlit run dashboard/app.py -- --logdir runs    # from the repository
    stability-dashboard --logdir runs                  # installed (dashboard.cli): the same

The log directory comes from ``--logdir``, else the environment variable ``MONITOR_LOGDIR``,
else ``./runs``. The app binds to 127.0.0.1 from any working directory
(``dashboard/.streamlit/config.toml``, read next to this file); to reach it from another
machine pass ``--server.address 0.0.0.0`` (anyone who can reach the port can then change the
PSS settings of your runs: prefer an SSH tunnel). Started listening on every interface
without asking, it shows nothing but how to restart it (``dashboard.bind.guard``).

Data flow: cached readers (``dashboard.data``, one per run, reading only new events) ->
cached transforms (``dashboard.charts``, ``dashboard.alerts``) -> render. The only file the
app writes is ``control.json`` of the selected run, through ``monitor.schema.write_control``,
in a directory checked to lie inside the log directory.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import numpy as np
import streamlit as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `streamlit run dashboard/app.py` puts only dashboard/ on the path
    sys.path.insert(0, ROOT)

from dashboard import alerts, bind, charts, data  # noqa: E402
from monitor import schema  # noqa: E402

VIEWS = ("Overview", "Layers", "Learning rates", "PSS control")
MAX_ALERT_LINES = 8  # alerts spelled out above the table


def logdir_setting(argv: list[str] | None = None) -> str:
    """``--logdir`` after ``--`` on the command line, else $MONITOR_LOGDIR, else ./runs."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--logdir", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return args.logdir or os.environ.get("MONITOR_LOGDIR") or "runs"


bind.guard(logdir_setting())  # before anything is shown: never on every interface by accident


# ---------------------------------------------------------------------------------------
# Cached loader and transforms
# ---------------------------------------------------------------------------------------


@st.cache_resource(show_spinner=False)
def run_store(logdir: str) -> data.RunStore:
    return data.RunStore(logdir)


@st.cache_resource(show_spinner=False, max_entries=8)
def combined_table(key: tuple, _readers: tuple):
    """The tidy table of the selected runs; ``key`` holds (run dir, version) pairs."""
    return data.combine([r.table() for r in _readers])


@st.cache_data(show_spinner=False, max_entries=32)
def cached_heatmap(key: tuple, metric: str, layers: tuple[str, ...], _table):
    return charts.heatmap_matrix(_table, metric, layers)


@st.cache_data(show_spinner=False, max_entries=8)
def cached_alerts(key: tuple, _table):
    return alerts.find_alerts(_table)


@st.cache_data(show_spinner=False, max_entries=16)
def cached_layers(key: tuple, metric: str | None, _table) -> list[str]:
    return charts.layers_of(_table, metric)


def load(logdir: str, runs: list[data.RunInfo]):
    """Refresh the readers of ``runs`` (new events only) and return (key, table, readers)."""
    store = run_store(os.path.realpath(logdir))
    readers = tuple(store.reader(r) for r in runs)
    for reader in readers:
        reader.refresh()
    key = tuple((r.run_dir, r.version) for r in readers)
    return key, combined_table(key, readers), readers


def model_order(runs: list[data.RunInfo]) -> list[str]:
    order: list[str] = []
    for run in runs:
        order += [name for name in run.layers if name not in order]
    return order


# ---------------------------------------------------------------------------------------
# Widgets and messages
# ---------------------------------------------------------------------------------------


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
        help="Several runs are overlaid for comparison (e.g. PSS on against PSS off).")
    return [by_name[n] for n in chosen]


def layer_pattern(label: str, key: str, default: str = "") -> tuple[str, str | None]:
    """A regex text input; returns (pattern, error message or None)."""
    pattern = st.text_input(label, value=default, key=key,
                            help="Python regular expression, matched anywhere in the name")
    try:
        charts.filter_layers([], pattern)
    except Exception as err:
        return pattern, f"Invalid pattern {pattern!r}: {err}"
    return pattern, None


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
        elif reader.table().empty and not reader.errors:
            st.info(f"Run **{run.name}** has no logged values yet.")


def ago(t: float) -> str:
    seconds = max(0.0, time.time() - t)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


# ---------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------


def view_overview(runs, key, table, readers) -> None:
    st.subheader("Runs")
    rows = []
    for run in runs:
        steps = table["step"][table["run"] == run.name] if len(table) else []
        rows.append({"run": run.name, "state": run.status,
                     "last step": int(np.max(steps)) if len(steps) else None,
                     "layers": len(run.layers) or None, "updated": ago(run.updated)})
    st.dataframe(rows, hide_index=True, width="stretch")
    if not len(table):
        return
    found = cached_alerts(key, table)
    st.subheader(f"Alerts ({len(found)})")
    if len(found):
        lines = [f"- :red[**{a.kind}**] in run `{a.run}`, layer `{a.layer}`, step {a.step}: "
                 f"{a.detail}" for a in found.head(MAX_ALERT_LINES).itertuples()]
        st.markdown("\n".join(lines))
        if len(found) > MAX_ALERT_LINES:
            st.caption(f"... and {len(found) - MAX_ALERT_LINES} more in the table below.")
        st.dataframe(found, hide_index=True, width="stretch")
    else:
        st.success("No alerts: no stable-rank collapse, no sustained SJE above 0.8, no "
                   "non-finite values.")
    monitor_messages(runs, readers)
    present = set(table["metric"].cat.categories)
    if schema.TAG_LOSS in present or schema.TAG_GLOBAL_GRAD_NORM in present:
        st.plotly_chart(charts.overview_figure(table), width="stretch", key="overview")
    else:
        st.info("These runs logged neither train/loss nor train/grad_norm (pass the loss with "
                "`mon.log(loss=...)`).")


def monitor_messages(runs, readers, last: int = 5) -> None:
    """What the monitor said: metrics that failed at a step, metrics a layer lacks."""
    notes = []
    for run, reader in zip(runs, readers):
        for step, text in texts_of(reader, schema.TAG_FAILURE_TEXT)[-last:]:
            notes.append(f"**{run.name}**, step {step}, failed metrics:\n{text}")
        for step, text in texts_of(reader, schema.TAG_UNSUPPORTED):
            notes.append(f"**{run.name}**, not computed: {text}")
    if notes:
        with st.expander(f"Messages from the monitor ({len(notes)})"):
            st.markdown("\n\n".join(notes))


def view_layers(runs, key, table) -> None:
    metrics = charts.layer_metrics(table)
    if not metrics:
        st.info("No per-layer metrics logged yet in the selected runs.")
        return
    left, mid, right = st.columns([2, 3, 1])
    metric = left.selectbox("Metric", metrics, key="layers_metric")
    with mid:
        pattern, error = layer_pattern("Filter layers (regex)", "layers_filter")
    log = right.toggle("Log scale", value=metric in charts.LOG_METRICS, key=f"log_{metric}")
    if error:
        st.error(error)
        return
    all_layers = charts.layer_order(cached_layers(key, metric, table), model_order(runs))
    layers = charts.filter_layers(all_layers, pattern)
    if not layers:
        st.warning(f"No layer logged {metric} matches {pattern!r}.")
        return
    shown = layers[:charts.MAX_HEATMAP_LAYERS]
    run_names = [r.name for r in runs]
    heat_run = run_names[0]
    if len(run_names) > 1:
        heat_run = st.selectbox("Heatmap of run", run_names, key="heat_run")
    heat_table = table[table["run"] == heat_run] if len(run_names) > 1 else table
    steps, z = cached_heatmap(key + (heat_run,), metric, tuple(shown), heat_table)
    if len(shown) < len(layers):
        st.caption(f"Heatmap shows the first {len(shown)} of {len(layers)} matching layers; "
                   "narrow the filter to see the others.")
    st.plotly_chart(charts.heatmap_figure(shown, steps, z, metric, log),
                    width="stretch", key="heatmap")
    lines_pattern, error = layer_pattern("Layers to draw as lines (regex)", "lines_filter",
                                         default=_first_layers_pattern(layers))
    if error:
        st.error(error)
        return
    picked = charts.filter_layers(layers, lines_pattern)
    if len(picked) > charts.MAX_LINES:
        st.caption(f"{len(picked)} layers match; the first {charts.MAX_LINES} are drawn.")
    st.plotly_chart(charts.lines_figure(table, metric, picked, log), width="stretch",
                    key="lines")


def _first_layers_pattern(layers: list[str], n: int = 3) -> str:
    """A regex matching exactly the first ``n`` layers (the default line selection)."""
    return "^(" + "|".join(re.escape(name) for name in layers[:n]) + ")$"


def view_learning_rates(runs, key, table) -> None:
    present = set(charts.layer_metrics(table))
    if not {"lr", "lr_effective"} & present:
        st.info("No learning rates logged in the selected runs (metrics `lr` and "
                "`lr_effective` are written at logged steps after the optimizer step).")
        return
    all_layers = charts.layer_order(cached_layers(key, None, table), model_order(runs))
    pattern, error = layer_pattern("Layers (regex)", "lr_filter",
                                   default=_first_layers_pattern(all_layers, 4))
    if error:
        st.error(error)
        return
    layers = charts.filter_layers(all_layers, pattern)
    if len(layers) > charts.MAX_LINES:
        st.caption(f"{len(layers)} layers match; the first {charts.MAX_LINES} are drawn.")
    st.plotly_chart(charts.lr_figure(table, layers), width="stretch", key="lr")
    if "lr_effective" in present:
        heat_layers = charts.layer_order(cached_layers(key, "lr_effective", table),
                                         model_order(runs))[:charts.MAX_HEATMAP_LAYERS]
        first = table[table["run"] == runs[0].name] if len(runs) > 1 else table
        steps, z = cached_heatmap(key + (runs[0].name,), "lr_effective", tuple(heat_layers),
                                  first)
        st.plotly_chart(charts.heatmap_figure(heat_layers, steps, z, "lr_effective", log=True),
                        width="stretch", key="lr_heatmap")


# ---------------------------------------------------------------------------------------
# PSS control
# ---------------------------------------------------------------------------------------


def baseline_settings(run: data.RunInfo, control) -> schema.PSSConfig:
    """Settings in force: the control file's, else the job's start config, else defaults."""
    if control is not None:
        return control.settings
    config = run.meta.get("config")  # run.json may be anything: check before .get
    start = run.meta.get("pss") or (config.get("pss") if isinstance(config, dict) else None)
    if isinstance(start, dict):
        try:
            return schema.PSSConfig.from_dict(start)
        except schema.ControlError:
            pass
    return schema.PSSConfig()


def optional_float(label: str, text: str, empty_means: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise schema.ControlError(f"{label}: {text!r} is not a number; leave it empty for "
                                  f"{empty_means}") from None


def pss_form(run: data.RunInfo, base: schema.PSSConfig):
    """The settings widgets; returns (PSSConfig or None, error message or None)."""
    k = f"pss:{run.name}:"
    c1, c2, c3, c4 = st.columns(4)
    enabled = c1.checkbox("enabled", value=base.enabled, key=k + "enabled")
    tau = c2.number_input("tau (trigger ratio)", value=float(base.tau), step=0.1, format="%.3f",
                          key=k + "tau", help="trigger when g_t / m_{t-1} > tau; must be > 1")
    alpha = c3.number_input("alpha (EMA rate)", value=float(base.alpha), step=0.01,
                            format="%.4f", key=k + "alpha", help="in (0, 1]")
    warmup = c4.number_input("warm-up steps", value=int(base.warmup_steps), step=10,
                             key=k + "warmup")
    c1, c2, c3, c4 = st.columns(4)
    method = c1.selectbox("method", schema.PSS_METHODS,
                          index=schema.PSS_METHODS.index(base.method), key=k + "method")
    window = c2.number_input("window (conv)", value=int(base.window), step=2, key=k + "window")
    temperature = c3.text_input("temperature (softmax)",
                                value="" if base.temperature is None else str(base.temperature),
                                key=k + "temperature", help="empty: sigma_1")
    c_text = c4.text_input("c (log, softplus)", value="" if base.c is None else str(base.c),
                           key=k + "c", help="empty: sigma_k")
    c1, c2, c3 = st.columns([2, 1, 1])
    layers = c1.text_input("layers (regex on parameter names)", value=base.layers,
                           key=k + "layers")
    k_min = c2.number_input("k_min", value=int(base.k_min), step=1, key=k + "k_min",
                            help="least k = max(k_min, floor(SR)); 2 still smooths a layer "
                                 "whose stable rank fell to 1 (1 = the paper's rule)")
    k_max = c3.number_input("k_max", value=int(base.k_max), step=1, key=k + "k_max")
    c1, c2, c3, c4 = st.columns(4)
    flags = {name: col.checkbox(name.replace("_", " "), value=getattr(base, name),
                                key=k + name)
             for col, name in zip((c1, c2, c3, c4), ("include_embeddings", "per_layer",
                                                      "skip_update", "reset_optimizer_state"))}
    try:
        config = schema.PSSConfig(
            enabled=enabled, tau=float(tau), alpha=float(alpha), warmup_steps=int(warmup),
            method=method, window=int(window),
            temperature=optional_float("temperature", temperature, "sigma_1"),
            c=optional_float("c", c_text, "sigma_k"), layers=layers, k_min=int(k_min),
            k_max=int(k_max),
            **flags)
    except schema.ControlError as err:
        return None, str(err)
    return config, None


def view_pss(logdir: str, runs, table) -> None:
    names = [r.name for r in runs]
    name = st.selectbox("Run to steer", names, key="pss_run") if len(names) > 1 else names[0]
    run = next(r for r in runs if r.name == name)
    try:
        run_dir = data.resolve_run_dir(logdir, run.name)
    except ValueError as err:
        st.error(str(err))
        return
    run_table = table[table["run"] == run.name] if len(names) > 1 else table
    if "pss_flash" in st.session_state:
        st.success(st.session_state.pop("pss_flash"))
    if st.session_state.get("auto"):  # the job's acknowledgement arrives while the user looks
        st.fragment(pss_status, run_every=float(st.session_state.get("every", 5)))(
            logdir, run, run_dir)
    else:
        pss_status(logdir, run, run_dir)
    control, _ = read_control_safe(run_dir)
    base = baseline_settings(run, control)
    st.subheader("Change the settings")
    if run.status != "live":
        st.caption(f"This run is {run.status}: the job reads control.json only while it runs.")
    config, error = pss_form(run, base)
    if error:
        st.error(f"Invalid setting, nothing will be written: {error}")
    whatif(config, run_table)
    left, right, _ = st.columns([1, 1, 3])
    if left.button("Apply", type="primary", key="pss_apply"):
        if config is None:
            st.error(f"Not written: {error}")
        else:
            written, problem = data.write_control(run_dir, config)
            if problem:
                st.error(problem)
            else:
                flash(f"Wrote control.json version {written.version}; the job applies it "
                      "within a few steps and logs pss/control_version.")
    if right.button("Smooth now", key="pss_smooth",
                    help="one-shot request: the job smooths once, with the settings in force"):
        written, problem = data.write_control(run_dir, base, smooth_now=True)
        if problem:
            st.error(problem)
        else:
            flash(f"Requested smoothing (request {written.smooth_now}, control.json version "
                  f"{written.version}).")


def flash(message: str) -> None:
    """Show ``message`` after a rerun, so the state above reflects the file just written."""
    st.session_state["pss_flash"] = message
    st.rerun()


def read_control_safe(run_dir: str):
    """(ControlFile or None, error message or None)."""
    try:
        return schema.read_control(run_dir), None
    except schema.ControlError as err:
        return None, str(err)


def pss_status(logdir: str, run: data.RunInfo, run_dir: str) -> None:
    """The control file's version and what the job acknowledged (re-read on each call)."""
    control, control_error = read_control_safe(run_dir)
    _, table, readers = load(logdir, [run])
    show_control_state(run, control, control_error, table, readers[0])


def show_control_state(run, control, control_error, table, reader) -> None:
    st.subheader(f"PSS of run {run.name} ({run.status})")
    ack_steps, ack_versions = charts.series(table, schema.TAG_PSS_CONTROL_VERSION)
    c1, c2, c3 = st.columns(3)
    c1.metric("control.json version", control.version if control else "none")
    acked = int(ack_versions[-1]) if len(ack_versions) else None
    c2.metric("acknowledged by the job", acked if acked is not None else "none",
              help="last pss/control_version the job logged")
    c3.metric("at step", int(ack_steps[-1]) if len(ack_steps) else "-")
    if control_error:
        st.error(f"control.json is invalid ({control_error}); the job keeps its previous "
                 "settings. Apply writes a new valid version.")
    elif control is not None and acked != control.version:  # the job also takes a restart
        if run.status == "live":
            st.info(f"Waiting for the job to apply version {control.version}.")
        else:
            st.warning(f"Version {control.version} was not acknowledged and the run is "
                       f"{run.status}.")
    with st.expander("Current settings (control.json, else the job's start settings)"):
        st.json(baseline_settings(run, control).to_dict())
    notes = texts_of(reader, schema.TAG_PSS_CONTROL_TEXT)
    if notes:
        with st.expander("What the job said about control files", expanded=False):
            for step, text in notes[-5:]:
                st.markdown(f"**step {step}**: {text}")


def texts_of(reader: data.RunReader | None, tag: str) -> list[tuple[int, str]]:
    """(step, text) of one text tag of a run, in logged order."""
    if reader is None:
        return []
    texts = reader.texts()
    rows = texts[texts["tag"] == tag]
    return list(zip(rows["step"].tolist(), rows["text"].tolist()))


def whatif(config, table) -> None:
    steps, grads = charts.series(table, schema.TAG_GLOBAL_GRAD_NORM)
    st.subheader("What-if preview")
    if not len(steps):
        st.info("No train/grad_norm logged yet: nothing to replay.")
        return
    if config is None:
        st.info("Fix the settings above to see the preview.")
        return
    _, hits = charts.whatif_replay(steps, grads, config)
    share = 100.0 * hits.sum() / len(hits)
    st.caption(f"With tau={config.tau:g}, alpha={config.alpha:g}: {int(hits.sum())} of "
               f"{len(hits)} logged steps would trigger ({share:.2g}%). Replayed over logged "
               "steps only; the job checks every step (the paper: fewer than 0.1% of steps).")
    logged = charts.intervention_steps(table)
    st.plotly_chart(charts.whatif_figure(steps, grads, hits, logged), width="stretch",
                    key="whatif")


# ---------------------------------------------------------------------------------------
# Page
# ---------------------------------------------------------------------------------------


def render_view(view: str, logdir: str, runs: list[data.RunInfo]) -> None:
    key, table, readers = load(logdir, runs)
    show_read_problems(runs, readers)
    if view == "Overview":
        view_overview(runs, key, table, readers)
    elif view == "Layers":
        view_layers(runs, key, table)
    elif view == "Learning rates":
        view_learning_rates(runs, key, table)
    else:
        view_pss(logdir, runs, table)


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
    selected = pick_runs(runs)
    view = st.sidebar.radio("View", VIEWS, key="view")
    live = any(r.status == "live" for r in selected)
    auto = st.sidebar.toggle("Live refresh", value=live, key="auto",
                             help="re-read new events periodically (only what was appended)")
    every = st.sidebar.number_input("every (s)", min_value=1, max_value=600, value=5,
                                    key="every", disabled=not auto)
    if not selected:
        st.info("Select at least one run in the sidebar.")
        return
    if auto and view != "PSS control":  # the form must not re-run under the user's fingers
        st.fragment(render_view, run_every=float(every))(view, logdir, selected)
    else:
        render_view(view, logdir, selected)


main()
