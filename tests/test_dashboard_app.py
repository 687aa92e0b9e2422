"""The Streamlit app through Streamlit's AppTest: views, the PSS form, broken inputs."""

from __future__ import annotations

import os
import time

import pytest
from streamlit.testing.v1 import AppTest

from monitor import schema
from monitor.writer import EventWriter
from tests.dashboard_fixtures import (corrupt_at, event_file, truncate_last_record, write_meta_file,
                                      write_run)

APP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dashboard",
                   "app.py")
VIEWS = ("Overview", "Layers", "Learning rates", "PSS control")


def open_app(logdir, monkeypatch, timeout: float = 60) -> AppTest:
    monkeypatch.setenv("MONITOR_LOGDIR", str(logdir))
    at = AppTest.from_file(APP, default_timeout=timeout)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def show(at: AppTest, view: str) -> AppTest:
    at.sidebar.radio(key="view").set_value(view).run()
    assert not at.exception, (view, [e.value for e in at.exception])
    return at


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def age(path, seconds: float) -> None:
    """Make a run look written ``seconds`` ago (discovery sorts runs by modification time)."""
    t = time.time() - seconds
    for name in os.listdir(path):
        os.utime(os.path.join(path, name), (t, t))


@pytest.fixture
def logdir(tmp_path):
    write_run(str(tmp_path / "pss_off"), pss=False, seed=1, steps=30)
    age(tmp_path / "pss_off", 600)
    write_run(str(tmp_path / "pss_on"), pss=True, steps=40)
    return tmp_path


def test_every_view_renders_single_and_compared(logdir, monkeypatch):
    at = open_app(logdir, monkeypatch)
    assert at.sidebar.multiselect(key="runs").value == ["pss_on"]  # newest, no click
    for view in VIEWS:
        show(at, view)
        assert at.get("plotly_chart"), view
        assert not at.error, (view, texts(at.error))
    at.sidebar.multiselect(key="runs").set_value(["pss_on", "pss_off"]).run()
    for view in VIEWS:
        show(at, view)
        assert at.get("plotly_chart"), view
        assert not at.error, (view, texts(at.error))


def test_overview_lists_alerts_with_layer_and_step(logdir, monkeypatch):
    at = open_app(logdir, monkeypatch)
    alerts = at.dataframe[0].value
    rows = set(zip(alerts["kind"], alerts["layer"], alerts["step"]))
    assert ("stable rank collapse", "blocks.0.attn.weight", 200) in rows
    assert ("SJE sustained", "embed.weight", 100) in rows
    assert ("non-finite", "(all)", 370) in rows
    messages = texts(at.markdown)
    assert "step 20, failed metrics" in messages and "SVD did not converge" in messages


def test_layers_view_filter_and_bad_regex(logdir, monkeypatch):
    at = show(open_app(logdir, monkeypatch), "Layers")
    at.selectbox(key="layers_metric").set_value("sje").run()
    at.text_input(key="layers_filter").set_value("attn").run()
    assert not at.exception and len(at.get("plotly_chart")) == 2
    at.text_input(key="layers_filter").set_value("(").run()
    assert not at.exception
    assert "Invalid pattern" in texts(at.error)


def test_pss_form_writes_exactly_the_control_file(logdir, monkeypatch):
    run_dir = logdir / "pss_on"
    before = set(os.listdir(run_dir))
    at = show(open_app(logdir, monkeypatch), "PSS control")
    k = "pss:pss_on:"
    at.number_input(key=k + "tau").set_value(3.0)
    at.number_input(key=k + "alpha").set_value(0.05)
    at.selectbox(key=k + "method").set_value("softmax")
    at.text_input(key=k + "temperature").set_value("0.5")
    at.text_input(key=k + "layers").set_value(r"blocks\.\d+\.attn")
    at.checkbox(key=k + "skip_update").check()
    at.run()
    assert not at.error, texts(at.error)
    at.button(key="pss_apply").click().run()
    assert set(os.listdir(run_dir)) - before == {schema.CONTROL_FILENAME}
    expected = schema.PSSConfig(tau=3.0, alpha=0.05, warmup_steps=0, method="softmax",
                                temperature=0.5, layers=r"blocks\.\d+\.attn", skip_update=True)
    text = (run_dir / schema.CONTROL_FILENAME).read_text()
    assert text == schema.ControlFile(version=1, settings=expected).to_json()
    assert "version 1" in texts(at.success)
    at.button(key="pss_smooth").click().run()
    control = schema.read_control(run_dir)
    assert (control.version, control.smooth_now, control.settings) == (2, 1, expected)
    assert set(os.listdir(run_dir)) - before == {schema.CONTROL_FILENAME}
    assert [m.value for m in at.metric][:2] == ["2", "1"]  # file version, acknowledged


@pytest.mark.parametrize("widget, key, value, message", [
    ("number_input", "tau", 0.5, "tau: 0.5 is not allowed"),
    ("number_input", "alpha", 0.0, "alpha: 0.0 is not allowed"),
    ("number_input", "alpha", 1.5, "alpha: 1.5"),
    ("number_input", "warmup", -1, "warmup_steps: -1"),
    ("number_input", "window", 2, "window: 2"),
    ("number_input", "k_max", 0, "k_max: 0"),
    ("number_input", "k_min", 0, "k_min: 0"),
    ("number_input", "k_min", 65, "k_min: 65 is not allowed; expected an integer in [1, k_max = 64]"),
    ("text_input", "temperature", "hot", "temperature: 'hot' is not a number"),
    ("text_input", "c", "-1", "c: -1.0 is not allowed"),
    ("text_input", "layers", "blocks.(", "is not a valid regular expression"),
])
def test_pss_form_refuses_invalid_values(logdir, monkeypatch, widget, key, value, message):
    at = show(open_app(logdir, monkeypatch), "PSS control")
    getattr(at, widget)(key="pss:pss_on:" + key).set_value(value).run()
    assert message in texts(at.error)
    at.button(key="pss_apply").click().run()
    assert "Not written" in texts(at.error)
    assert not (logdir / "pss_on" / schema.CONTROL_FILENAME).exists()


def test_invalid_control_file_is_reported_and_replaced(logdir, monkeypatch):
    (logdir / "pss_on" / schema.CONTROL_FILENAME).write_text('{"version": 1, "bogus": 2}')
    at = show(open_app(logdir, monkeypatch), "PSS control")
    assert "control.json is invalid" in texts(at.error)
    at.button(key="pss_apply").click().run()
    # the damaged file's version is still legible, so the new one supersedes it
    assert schema.read_control(logdir / "pss_on").version == 2


def test_corrupt_and_truncated_files(tmp_path, monkeypatch):
    write_run(str(tmp_path / "killed"), steps=20)
    truncate_last_record(event_file(str(tmp_path / "killed")))
    write_run(str(tmp_path / "corrupt"), steps=20)
    corrupt_at(event_file(str(tmp_path / "corrupt")), offset_from_end=5000)
    at = open_app(tmp_path, monkeypatch)
    at.sidebar.multiselect(key="runs").set_value(["killed", "corrupt"]).run()
    for view in VIEWS:
        show(at, view)
        assert "is corrupt at byte" in texts(at.error)
        assert "incomplete record" in texts(at.warning)
        assert at.get("plotly_chart"), view


def test_empty_and_missing_log_directory(tmp_path, monkeypatch):
    at = open_app(tmp_path, monkeypatch)
    assert "No runs under" in texts(at.info)
    at = open_app(tmp_path / "missing", monkeypatch)
    assert "does not exist" in texts(at.warning)


def test_run_without_events_and_without_layer_metrics(tmp_path, monkeypatch):
    (tmp_path / "starting").mkdir()
    write_meta_file(str(tmp_path / "starting"), ["w"], "running")
    with EventWriter(str(tmp_path / "loss_only")) as writer:
        for step in range(5):
            writer.write(step, {schema.TAG_LOSS: 1.0 / (step + 1)})
    age(tmp_path / "loss_only", 600)
    at = open_app(tmp_path, monkeypatch)
    assert "has no events yet" in texts(at.info)
    at.sidebar.multiselect(key="runs").set_value(["loss_only"]).run()
    assert at.get("plotly_chart")  # the loss chart
    assert "No per-layer metrics" in texts(show(at, "Layers").info)
    assert "No learning rates" in texts(show(at, "Learning rates").info)
    show(at, "PSS control")
    assert "No train/grad_norm" in texts(at.info)


def test_refresh_picks_up_new_events(tmp_path, monkeypatch):
    write_run(str(tmp_path / "live"), steps=10, status="running")
    at = open_app(tmp_path, monkeypatch)
    assert at.sidebar.toggle(key="auto").value is True  # a live run turns live refresh on
    assert at.table[0].value["last step"].iloc[0] == 90
    write_run(str(tmp_path / "live"), steps=5, start_step=10, status="running")
    at.run()
    assert not at.exception
    assert at.table[0].value["last step"].iloc[0] == 140
    show(at, "PSS control")  # live refresh on: the status panel runs as a fragment
    assert [m.label for m in at.metric][:2] == ["control.json version", "acknowledged by the job"]
    assert "live" in texts(at.subheader)


def test_empty_log_directory_opens_the_first_run_that_appears(tmp_path, monkeypatch):
    at = open_app(tmp_path, monkeypatch)
    assert "No runs under" in texts(at.info)
    write_run(str(tmp_path / "new"), steps=3, status="running")
    at.run()
    assert at.sidebar.multiselect(key="runs").value == ["new"]
    assert at.get("plotly_chart")


# ---------------------------------------------------------------------------------------
# The defects of issue 13, each reproduced first
# ---------------------------------------------------------------------------------------


def figures(at: AppTest) -> dict[str, dict]:
    """Plotly figures of the page by title."""
    import json

    out = {}
    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        out[spec["layout"].get("title", {}).get("text", "")] = spec
    return out


def values(array) -> list:
    """A Plotly JSON array, plain or binary-encoded (``{"dtype", "bdata"}``)."""
    import base64

    import numpy as np

    if isinstance(array, dict):
        return np.frombuffer(base64.b64decode(array["bdata"]), array["dtype"]).tolist()
    return list(array)


def test_a_run_with_one_logged_point_draws_a_marker(tmp_path, monkeypatch):
    write_run(str(tmp_path / "young"), steps=1, status="finished")
    at = open_app(tmp_path, monkeypatch)
    loss = figures(at)["loss and gradient norm"]["data"][0]
    assert "markers" in loss["mode"], loss["mode"]
    show(at, "Layers")
    lines = figures(at)["stable_rank per layer"]["data"]
    assert lines and all("markers" in trace["mode"] for trace in lines)


def test_a_new_live_run_is_waited_for_not_blamed(tmp_path, monkeypatch):
    with EventWriter(str(tmp_path / "new")) as writer:  # the hook's header only
        writer.write(0, {schema.TAG_SJE_K_MAX: 16.0}, {schema.TAG_RUN_CONFIG: "{}"})
    write_meta_file(str(tmp_path / "new"), ["w"], "running")
    at = open_app(tmp_path, monkeypatch)
    assert "logged neither" not in texts(at.info)
    assert "No loss or gradient norm logged yet" in texts(at.info)


def test_what_the_job_said_names_the_step_once(tmp_path, monkeypatch):
    write_run(str(tmp_path / "run"), steps=5)
    with EventWriter(str(tmp_path / "run")) as writer:
        writer.write(245, {}, {schema.TAG_PSS_CONTROL_TEXT:
                               "step 245: applied control.json version 2: {'tau': 3.0}"})
    at = show(open_app(tmp_path, monkeypatch), "PSS control")
    said = texts(at.markdown)
    assert "**step 245**: applied control.json version 2" in said
    assert "step 245: step 245" not in said.replace("**", "")


def test_learning_rate_heatmaps_one_per_run_labelled(logdir, monkeypatch):
    at = open_app(logdir, monkeypatch)
    at.sidebar.multiselect(key="runs").set_value(["pss_on", "pss_off"]).run()
    show(at, "Learning rates")
    titles = [t for t in figures(at) if t.startswith("effective learning rate")]
    assert sorted(titles) == ["effective learning rate: layer x step · run pss_off",
                              "effective learning rate: layer x step · run pss_on"]


def test_live_refresh_follows_the_selection(tmp_path, monkeypatch):
    write_run(str(tmp_path / "done"), steps=5, status="finished")
    write_run(str(tmp_path / "live"), steps=5, status="running")
    age(tmp_path / "live", 30)  # still live (pid alive), but not the newest
    at = open_app(tmp_path, monkeypatch)
    assert at.sidebar.multiselect(key="runs").value == ["done"]
    assert at.sidebar.toggle(key="auto").value is False
    at.sidebar.multiselect(key="runs").set_value(["live"]).run()
    assert at.sidebar.toggle(key="auto").value is True
    at.sidebar.toggle(key="auto").set_value(False).run()  # the user's choice then holds
    at.run()
    assert at.sidebar.toggle(key="auto").value is False


def test_run_states_interrupted_crashed_and_stale(tmp_path, monkeypatch):
    import json
    import subprocess
    import sys

    for name, state in (("ctrl_c", "interrupted"), ("boom", "crashed"), ("killed", "running")):
        write_run(str(tmp_path / name), steps=5, status=state)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    meta_path = tmp_path / "killed" / schema.RUN_FILENAME
    meta = json.loads(meta_path.read_text())
    meta.update(pid=dead.pid, host=__import__("socket").gethostname())
    meta_path.write_text(json.dumps(meta))
    at = open_app(tmp_path, monkeypatch)
    at.sidebar.multiselect(key="runs").set_value(["ctrl_c", "boom", "killed"]).run()
    table = at.table[0].value
    assert dict(zip(table.index, table["state"])) == {
        "ctrl_c": "interrupted", "boom": "crashed", "killed": "stale"}


def test_whatif_preview_finds_the_jobs_interventions_on_its_settings(tmp_path, monkeypatch):
    """A real job logging every 10 steps, spiking between logged steps: on the job's own
    settings the preview triggers exactly where the job intervened."""
    from tests.test_pss_inputs import train

    config = schema.PSSConfig(warmup_steps=5, method="clip")
    mon = train(str(tmp_path / "job"), 60, config, spikes=[(23, 4.0), (47, 6.0)])
    job = mon.pss.interventions
    assert job and all(s % 10 for s in job)
    at = show(open_app(tmp_path, monkeypatch), "PSS control")
    caption = texts(at.caption)
    assert f"{len(job)} of 60 steps would trigger" in caption, caption
    whatif = next(f for t, f in figures(at).items() if t.startswith("what-if"))
    trig = next(d for d in whatif["data"] if d["name"] == "would trigger")
    assert values(trig["x"]) == job
    at.number_input(key="pss:job:warmup").set_value(30).run()  # step 23 is now in warm-up
    assert "1 of 60 steps would trigger" in texts(at.caption)


def test_a_live_run_with_planned_steps_shows_speed_and_eta(tmp_path, monkeypatch):
    """``config/total_steps`` (logged by the HF and Lightning callbacks) gives the ETA."""
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    from monitor.writer import step_event

    run = tmp_path / "live"
    writer = EventFileWriter(str(run))
    start = time.time() - 100
    writer.add_event(step_event(0, {schema.TAG_TOTAL_STEPS: 1000.0}, wall_time=start))
    for step in range(0, 100, 10):  # one step per second
        writer.add_event(step_event(step, {schema.TAG_LOSS: 1.0}, wall_time=start + step))
    writer.close()
    write_meta_file(str(run), ["w"], "running")  # this process's pid: live
    row = open_app(tmp_path, monkeypatch).table[0].value.iloc[0]
    assert (row["state"], row["total steps"], row["steps/s"]) == ("live", 1000, 1.0)
    assert row["ETA"] == "15 min"  # (1000 - 90) steps at 1 step/s
