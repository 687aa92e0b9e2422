"""The dashboard over runs produced by the real monitor: a tiny model trained a few steps."""

from __future__ import annotations

import os

import pytest

from monitor import schema


APP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dashboard",
                   "app.py")
VIEWS = ("Overview", "Layers", "Learning rates", "PSS control")


def train(run_dir: str, steps: int, pss: bool, on_step=None) -> list[str]:
    """Train a small MLP with ``monitor.watch`` (every step logged, preset full);
    ``on_step(model, step)`` runs after each optimizer step (to plant a fault)."""
    import torch
    from torch import nn

    import monitor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = schema.PSSConfig(warmup_steps=2) if pss else None
    with monitor.watch(model, opt, logdir=run_dir, every=1, preset="full", pss=config) as mon:
        for step in range(steps):
            x = torch.randn(32, 8)
            loss = nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long())
            loss.backward()
            opt.step()
            opt.zero_grad()
            if on_step is not None:
                on_step(model, step)
            mon.log(loss=loss)
    return [name for name, _ in model.named_parameters()]


@pytest.fixture(scope="module")
def real_logdir(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("real")
    names = train(str(logdir / "pss_off"), steps=8, pss=False)
    train(str(logdir / "pss_on"), steps=12, pss=True)
    return logdir, names


def test_reader_matches_tensorboard_on_a_real_run(real_logdir):
    from dashboard import data
    from tests.helpers import read_scalars

    logdir, names = real_logdir
    reader = data.RunReader(str(logdir / "pss_on"))
    reader.refresh()
    assert reader.errors == [] and reader.pending_bytes == 0
    table = reader.table()
    ours: dict[str, dict[int, float]] = {}
    for metric, layer, step, value in zip(table["metric"], table["layer"], table["step"],
                                          table["value"]):
        ours.setdefault(f"{metric}/{layer}" if layer else metric, {})[int(step)] = value
    theirs = read_scalars(str(logdir / "pss_on"))
    assert ours.keys() == theirs.keys()
    for tag in theirs:
        assert ours[tag].keys() == theirs[tag].keys(), tag
    run = next(r for r in data.discover_runs(str(logdir)) if r.name == "pss_on")
    assert run.status == "finished" and list(run.layers) == names
    assert set(table[table["metric"] == "stable_rank"]["layer"]) == {
        n for n in names if n.endswith("weight")}


def test_every_view_renders_on_real_runs(real_logdir, monkeypatch):
    from streamlit.testing.v1 import AppTest

    logdir, _ = real_logdir
    monkeypatch.setenv("MONITOR_LOGDIR", str(logdir))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert at.sidebar.multiselect(key="runs").value == ["pss_on"]
    at.sidebar.multiselect(key="runs").set_value(["pss_on", "pss_off"]).run()
    for view in VIEWS:
        at.sidebar.radio(key="view").set_value(view).run()
        assert not at.exception, (view, [e.value for e in at.exception])
        assert not at.error, (view, [e.value for e in at.error])
        assert at.get("plotly_chart"), view


def test_pss_form_on_a_real_run(real_logdir, monkeypatch):
    from streamlit.testing.v1 import AppTest

    logdir, _ = real_logdir
    run_dir = logdir / "pss_on"
    monkeypatch.setenv("MONITOR_LOGDIR", str(logdir))
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["view"] = "PSS control"
    at.run()
    # the form starts from the job's own settings (run.json)
    warmup = 2
    assert at.number_input(key="pss:pss_on:warmup").value == warmup
    at.number_input(key="pss:pss_on:tau").set_value(4.0).run()
    # the job wrote its starting settings as version 1; Apply supersedes them
    before = schema.read_control(run_dir).version
    at.button(key="pss_apply").click().run()
    control = schema.read_control(run_dir)
    assert control.version == before + 1
    assert control.settings == schema.PSSConfig(warmup_steps=warmup, tau=4.0)


def test_whatif_preview_reproduces_the_jobs_logged_ratios(real_logdir):
    """Logged every step, the preview's replay equals what the job's detector computed."""
    import numpy as np

    from dashboard import charts, data, whatif

    logdir, _ = real_logdir
    reader = data.RunReader(str(logdir / "pss_on"))
    reader.refresh()
    table = reader.table()
    steps, grads = charts.series(table, schema.TAG_GLOBAL_GRAD_NORM)
    logged_steps, logged_ratios = charts.series(table, schema.TAG_PSS_TRIGGER_RATIO)
    assert len(steps) == 12 and np.array_equal(steps, logged_steps)
    ratios, hits = whatif.whatif_replay(steps, grads, schema.PSSConfig(warmup_steps=2))
    np.testing.assert_allclose(ratios, logged_ratios, rtol=1e-6)
    _, interventions = charts.series(table, schema.TAG_PSS_INTERVENTION)
    assert np.array_equal(hits, interventions == 1)
