"""PSS control: what the job acknowledged, the settings form, the what-if preview, Apply.

The what-if replays ``monitor.pss.detect.Detector`` over the detector's input at *every*
step (``pss_input.bin``, written by the job), so on the job's own settings it finds exactly
the job's interventions. Runs written before that file existed fall back to a replay over
the logged gradient norms, and say so.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from dashboard import cache, charts, data, transforms, whatif, widgets
from dashboard.views import Context
from monitor import schema


def render(ctx: Context) -> None:
    names = [r.name for r in ctx.runs]
    name = st.selectbox("Run to steer", names, key="pss_run") if len(names) > 1 else names[0]
    run = next(r for r in ctx.runs if r.name == name)
    try:
        run_dir = data.resolve_run_dir(ctx.logdir, run.name)
    except ValueError as err:
        st.error(str(err))
        return
    if "pss_flash" in st.session_state:
        st.success(st.session_state.pop("pss_flash"))
    if st.session_state.get("auto"):  # the job's acknowledgement arrives while the user looks
        st.fragment(status, run_every=float(st.session_state.get("every", 5)))(
            ctx.logdir, run.name, run_dir)
    else:
        status(ctx.logdir, run.name, run_dir)
    control, _ = read_control_safe(run_dir)
    base = baseline_settings(run, control)
    st.subheader("Change the settings")
    if run.status != "live":
        st.caption(f"This run is {run.status}: the job reads control.json only while it runs.")
    config, error = form(run, base)
    if error:
        st.error(f"Invalid setting, nothing will be written: {error}")
    preview(config, ctx.run_rows(run.name, schema.TAG_PSS_INTERVENTION,
                                 schema.TAG_GLOBAL_GRAD_NORM), run_dir)
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


def form(run: data.RunInfo, base: schema.PSSConfig):
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
            k_max=int(k_max), **flags)
    except schema.ControlError as err:
        return None, str(err)
    return config, None


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


def status(logdir: str, name: str, run_dir: str) -> None:
    """The control file's version and what the job acknowledged (re-read on each call)."""
    runs = cache.fresh_runs(logdir, [name])
    if not runs:
        st.warning(f"Run {name} is gone from the log directory.")
        return
    control, control_error = read_control_safe(run_dir)
    _, readers = cache.load(logdir, runs)
    table = readers[0].table([schema.TAG_PSS_CONTROL_VERSION])
    show_control_state(runs[0], control, control_error, table, readers[0])


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
    notes = widgets.texts_of(reader, schema.TAG_PSS_CONTROL_TEXT)
    if notes:
        with st.expander("What the job said about control files", expanded=False):
            for step, text in notes[-5:]:
                st.markdown(f"**step {step}**: {transforms.strip_step(text)}")
    events = transforms.pss_event_rows(reader.texts(), schema.TAG_PSS_EVENTS)
    if len(events):
        st.caption(f"What PSS did ({events['step'].nunique()} interventions, pss/events)")
        st.dataframe(events.drop(columns="run"), hide_index=True, width="stretch")


def preview(config, table, run_dir: str) -> None:
    st.subheader("What-if preview")
    if config is None:
        st.info("Fix the settings above to see the preview.")
        return
    logged = charts.intervention_steps(table)
    segments = cache.detector_input_of(run_dir)
    if segments:
        steps, values, _, hits = whatif.whatif_exact(segments, config)
        job = whatif.whatif_exact(segments, None)
        job_hits = job[0][job[3]]
        share = 100.0 * hits.sum() / max(1, len(hits))
        st.caption(
            f"With tau={config.tau:g}, alpha={config.alpha:g}, warm-up {config.warmup_steps}: "
            f"**{int(hits.sum())} of {len(hits)} steps would trigger** ({share:.2g}%), replayed "
            "with the job's own rule over the detector's input at every step (pss_input.bin). "
            f"The job's detector triggered at {_steps_text(job_hits)} (on its settings; "
            "the paper: fewer than 0.1% of steps)."
            + (" Per-layer detection is not replayed: this is the global rule." if
               config.per_layer else ""))
        widgets.chart(whatif.whatif_figure(steps, values, hits, logged, every_step=True),
                      "whatif")
        return
    steps, grads = charts.series(table, schema.TAG_GLOBAL_GRAD_NORM)
    if not len(steps):
        st.info("No train/grad_norm logged yet: nothing to replay.")
        return
    _, hits = whatif.whatif_replay(steps, grads, config)
    share = 100.0 * hits.sum() / len(hits)
    st.caption(f"With tau={config.tau:g}, alpha={config.alpha:g}: {int(hits.sum())} of "
               f"{len(hits)} logged steps would trigger ({share:.2g}%). This run has no "
               "pss_input.bin (PSS off, or an older monitor): replayed over logged steps only, "
               "while the job checks every step, so it can differ from what the job did.")
    widgets.chart(whatif.whatif_figure(steps, grads, hits, logged), "whatif")


def _steps_text(steps: np.ndarray, n: int = 8) -> str:
    if not len(steps):
        return "no step"
    shown = ", ".join(str(int(s)) for s in steps[:n])
    return f"step(s) {shown}" + (f" and {len(steps) - n} more" if len(steps) > n else "")
