"""Pure transforms and figures of the dashboard, alerts, and the what-if replay."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from dashboard import alerts, charts, data, whatif
from monitor import schema
from tests.dashboard_fixtures import layer_names, write_run


def tidy(rows) -> pd.DataFrame:
    """A tidy table from (run, step, metric, layer, value) tuples."""
    run, step, metric, layer, value = zip(*rows)
    return pd.DataFrame({"run": pd.Categorical(run), "step": np.asarray(step, np.int64),
                         "wall_time": np.zeros(len(step)), "metric": pd.Categorical(metric),
                         "layer": pd.Categorical(layer), "value": np.asarray(value, float)})


@pytest.fixture(scope="module")
def fixture_table(tmp_path_factory):
    path = tmp_path_factory.mktemp("charts") / "run"
    write_run(str(path), n_layers=6, steps=40)
    reader = data.RunReader(str(path), "run")
    reader.refresh()
    return reader.table()


def test_heatmap_matrix_in_model_order(fixture_table):
    layers = list(reversed(layer_names(6)))
    steps, z = charts.heatmap_matrix(fixture_table, "param_norm", layers)
    assert z.shape == (6, 40) and list(steps[:3]) == [0, 10, 20]
    # param_norm = 5 + j + 0.01 i for layer j (model order), logged step i
    np.testing.assert_allclose(z[-1, 0], 5.0, rtol=1e-6)
    np.testing.assert_allclose(z[0, 2], 5.0 + 5 + 0.02, rtol=1e-6)


def test_heatmap_bins_long_runs(fixture_table):
    steps, z = charts.heatmap_matrix(fixture_table, "param_norm", layer_names(6), max_steps=8)
    assert z.shape == (6, 8) and len(steps) == 8
    np.testing.assert_allclose(z[0, 0], 5.0 + 0.01 * 2, rtol=1e-6)  # mean of 5 steps
    fig = charts.heatmap_figure(layer_names(6), steps, z, "param_norm", log=True)
    assert isinstance(fig.data[0], go.Heatmap)


def test_downsample_keeps_spikes():
    x = np.arange(100_000)
    y = np.ones(100_000)
    y[54_321] = 1000.0
    dx, dy = charts.downsample(x, y, max_points=500)
    assert len(dx) <= 500 and dy.max() == 1000.0 and dy.min() == 1.0
    y[:1000] = np.nan
    y[5] = np.inf
    dx, dy = charts.downsample(x, y, max_points=500)
    assert np.isnan(dy[:4]).all() and np.nanmax(dy) == 1000.0  # gaps, never inf


def test_heatmap_figure_hides_non_finite():
    z = np.array([[1.0, np.inf, np.nan], [2.0, -np.inf, 100.0]])
    fig = charts.heatmap_figure(["a", "b"], np.arange(3), z, "update_ratio", log=True)
    shown = np.asarray(fig.data[0].z, float)
    assert np.isnan(shown[:, 1]).all() and shown[1, 2] == 2.0


def test_layer_order_and_filter():
    assert charts.layer_order(["c", "a", "b", ""], ["a", "b", "z"]) == ["a", "b", "c"]
    assert charts.filter_layers(["blocks.0.attn", "blocks.0.mlp"], r"attn") == ["blocks.0.attn"]
    with pytest.raises(Exception):
        charts.filter_layers(["x"], "(")


def test_figures_build(fixture_table):
    layers = layer_names(6)
    assert len(charts.lines_figure(fixture_table, "stable_rank", layers[:2]).data) == 2
    many = tidy([("r", s, "sje", f"l{i}", 0.5) for i in range(30) for s in range(3)])
    names = [f"l{i}" for i in range(30)]
    assert len(charts.lines_figure(many, "sje", names).data) == charts.MAX_LINES
    overview = charts.overview_figure(fixture_table)
    markers = [t for t in overview.data if t.name.startswith("PSS intervention")]
    assert markers and list(markers[0].x) == [200, 300]
    lr = charts.lr_figure(fixture_table, layers[:2])
    assert len(lr.data) == 4


def test_alerts_name_layer_and_step(fixture_table):
    found = alerts.find_alerts(fixture_table)
    by_kind = {kind: rows for kind, rows in found.groupby("kind")}
    collapse = by_kind["stable rank collapse"].iloc[0]
    assert (collapse["layer"], collapse["step"]) == ("blocks.0.attn.weight", 200)
    sje = by_kind["SJE sustained"].iloc[0]
    assert (sje["layer"], sje["step"]) == ("embed.weight", 100)
    nonfinite = by_kind["non-finite"]
    assert set(zip(nonfinite["layer"], nonfinite["step"])) == {("(all)", 370),
                                                               ("blocks.0.mlp.weight", 370)}
    details = " ".join(nonfinite["detail"])
    assert "3 non-finite gradient" in details and "grad_norm is nan" in details
    assert "update_ratio is inf" in details


def test_nan_update_ratio_of_a_zero_weight_is_no_alert():
    table = tidy([("r", 0, "param_norm", "b", 0.0), ("r", 0, "update_ratio", "b", math.nan),
                  ("r", 1, "param_norm", "b", 0.1), ("r", 1, "update_ratio", "b", math.nan),
                  ("r", 1, "update_ratio", "c", math.nan), ("r", 1, "grad_norm", "c", math.inf)])
    found = alerts.find_alerts(table)
    detail = dict(zip(zip(found["layer"], found["step"]), found["detail"]))
    assert set(detail) == {("b", 1), ("c", 1)}  # not ("b", 0): its weight norm was zero
    assert detail[("b", 1)].startswith("update_ratio is nan")
    assert "also in 1 other layer(s): c" in detail[("b", 1)]
    assert detail[("c", 1)].startswith("grad_norm is inf")


def test_stable_rank_collapse_rule():
    def collapse(values, **kw):
        table = tidy([("r", i, "stable_rank", "w", v) for i, v in enumerate(values)])
        found = alerts.find_alerts(table, **kw)
        return list(found["step"])

    early_fall = [30.0, 20, 10, 8, 8, 8]
    assert collapse(early_fall, settle=3) == []  # falls before settling: normal
    assert collapse(early_fall + [3.9], settle=3) == [6]  # below half of the settled peak 8
    assert collapse(early_fall + [1.2], settle=100) == [6]  # nearly rank one: always
    assert collapse([1.0, 1.1, 1.0], settle=0) == []  # a rank-one layer stays quiet


def test_alerts_on_nan_metric_and_short_sje():
    table = tidy([("r", 0, "sje", "w", 0.9), ("r", 1, "sje", "w", 0.9), ("r", 2, "sje", "w", 0.1),
                  ("r", 3, "grad_norm", "w", math.nan)])
    found = alerts.find_alerts(table)
    assert list(found["kind"]) == ["non-finite"]
    assert found.iloc[0]["layer"] == "w" and found.iloc[0]["step"] == 3


def job_detector_on(grads, config):
    """What the job does: its controller's Detector, fed one value per step."""
    from monitor.pss.detect import Detector

    det = Detector(config.tau, config.alpha, config.warmup_steps)
    out = [det.update(float(g), step) for step, g in enumerate(grads)]
    return np.array([r for _, r in out]), np.array([t for t, _ in out])


@pytest.mark.parametrize("config", [schema.PSSConfig(warmup_steps=5),
                                    schema.PSSConfig(tau=2.0, alpha=0.3, warmup_steps=0),
                                    schema.PSSConfig(tau=4.0, alpha=1.0, warmup_steps=30)])
def test_whatif_replay_is_the_jobs_detector(config):
    rng = np.random.default_rng(0)
    grads = np.exp(rng.normal(0, 0.3, 200))
    grads[[20, 90, 91]] *= 8  # spikes
    grads[120:] *= 10  # a level shift
    grads[150] = math.inf
    grads[160] = math.nan
    steps = np.arange(200)
    ratios, hits = whatif.whatif_replay(steps, grads, config)
    want_ratios, want_hits = job_detector_on(grads, config)
    np.testing.assert_array_equal(hits, want_hits)
    np.testing.assert_allclose(ratios, want_ratios, rtol=0, atol=0)
    assert hits[150] and hits[160]  # a non-finite gradient always triggers
    assert not hits[-20:].any()  # the level shift is absorbed


def test_whatif_replay_warm_up_follows_logged_step_numbers():
    steps = np.array([0, 50, 100, 150, 200])
    grads = np.array([1.0, 1.0, 5.0, 1.0, 5.0])
    _, hits = whatif.whatif_replay(steps, grads, schema.PSSConfig(warmup_steps=120))
    assert hits.tolist() == [False, False, False, False, True]
    _, hits = whatif.whatif_replay(steps[:0], grads[:0], schema.PSSConfig())
    assert hits.shape == (0,)


def test_whatif_figure():
    steps = np.arange(10) * 10
    fig = whatif.whatif_figure(steps, np.ones(10), np.arange(10) == 3, np.array([30]))
    assert [t.name for t in fig.data] == ["global gradient norm", "would trigger",
                                          "the job intervened"]
    assert list(fig.data[1].x) == [30]


def test_global_tags_keep_full_name(fixture_table):
    x, y = charts.series(fixture_table, schema.TAG_LOSS)
    assert len(x) == 40 and np.all(np.diff(x) > 0)


def test_monitor_overhead_alert_uses_the_median_after_the_first_log():
    def overhead(values, **kw):
        table = tidy([("r", 10 * i, schema.TAG_MONITOR_OVERHEAD, "", v) for i, v in enumerate(values)])
        return alerts.find_alerts(table, **kw)

    assert overhead([0.9, 0.02, 0.03, 0.5]).empty  # a cold first log and one slow step
    found = overhead([0.01, 0.02, 0.3, 0.4])
    assert list(found["kind"]) == ["monitor overhead"] and list(found["step"]) == [20]
    assert "median 30%" in found.iloc[0]["detail"] and "max 40%" in found.iloc[0]["detail"]
    assert overhead([0.01, 0.3, 0.4], overhead_limit=0.5).empty


# ---------------------------------------------------------------------------------------
# Reading aids (dashboard.transforms)
# ---------------------------------------------------------------------------------------


def test_ema_smooth_is_tensorboards_debiased_ema():
    from dashboard import transforms

    y = np.array([1.0, 3.0, np.nan, 2.0])
    w = 0.6
    s1 = (1 - w) * 1.0
    s2 = w * s1 + (1 - w) * 3.0
    s3 = w * s2 + (1 - w) * 2.0
    expected = [s1 / (1 - w), s2 / (1 - w ** 2), np.nan, s3 / (1 - w ** 3)]
    np.testing.assert_allclose(transforms.ema_smooth(y, w), expected)
    np.testing.assert_array_equal(transforms.ema_smooth(y[:2], 0.0), y[:2])


def test_relative_heatmap_rows_show_change_whatever_the_start():
    from dashboard import transforms

    z = np.array([[50.0, 40.0, 5.0], [np.nan, 2.0, 1.0]])
    first = transforms.relative_rows(z, transforms.HEAT_SCALES[1])
    np.testing.assert_allclose(first, [[1.0, 0.8, 0.1], [np.nan, 1.0, 0.5]])
    median = transforms.relative_rows(z, transforms.HEAT_SCALES[2])
    np.testing.assert_allclose(median, [[1.25, 1.0, 0.125], [np.nan, 2 / 1.5, 1 / 1.5]])
    np.testing.assert_array_equal(transforms.relative_rows(z, "value"), z)


def test_default_lines_are_alerted_then_most_moved_layers():
    from dashboard import transforms

    rows = [("r", s, "stable_rank", name, v) for s, vals in ((0, (10, 10, 10)), (10, (10, 1, 9)))
            for name, v in zip(("a", "b", "c"), vals)]
    moved = list(transforms.movement(tidy(rows), "stable_rank").index)
    assert moved[:2] == ["b", "c"]
    assert transforms.default_lines(["c"], moved, ["a", "b", "c"], n=2) == ["c", "b"]


def test_pss_event_rows_parse_the_controllers_text():
    from dashboard import transforms

    text = ("step 236: intervention (trigger ratio 2.82 > tau 2.5); method conv; 2 layer(s) in 14 ms\n"
            "- h.0.attn.weight: k=8, sigma 3.21 -> 2.9, SR 8.5 -> 9.3\n"
            "- h.1.mlp.weight: not smoothed (SVD failed)")
    texts = pd.DataFrame({"run": ["r"], "step": [236], "wall_time": [0.0],
                          "tag": [schema.TAG_PSS_EVENTS], "text": [text]})
    rows = transforms.pss_event_rows(texts, schema.TAG_PSS_EVENTS)
    assert len(rows) == 1
    row = rows.iloc[0]
    assert (row["step"], row["reason"], row["method"], row["layer"], row["k"]) == (
        236, "trigger ratio 2.82 > tau 2.5", "conv", "h.0.attn.weight", 8)
    assert (row["sigma before"], row["sigma after"], row["SR before"], row["SR after"]) == (
        3.21, 2.9, 8.5, 9.3)
    assert transforms.strip_step("step 245: applied version 2") == "applied version 2"


def test_speed_and_eta():
    from dashboard import transforms

    rate, eta = transforms.speed(np.array([0, 10, 20]), np.array([100.0, 105.0, 110.0]), 220)
    assert rate == 2.0 and eta == 100.0
    assert transforms.speed(np.array([5]), np.array([1.0])) == (None, None)


def test_log_axis_and_one_point_lines():
    fig = charts.lines_figure(tidy([("r", 0, "grad_norm", "a", 0.5)]), "grad_norm", ["a"],
                              log=True)
    assert fig.data[0].mode == "lines+markers"
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.tickformat == "~g"


def test_x_axis_wall_and_relative_time():
    rows = [("r", s, "grad_norm", "a", 1.0) for s in range(3)]
    table = tidy(rows)
    table["wall_time"] = [3600.0, 7200.0, 10800.0]
    x, _ = charts.xy(table, "grad_norm", "a", style=charts.Style(x="relative time (h)"))
    np.testing.assert_allclose(x, [0.0, 1.0, 2.0])
    x, _ = charts.xy(table, "grad_norm", "a", style=charts.Style(x="wall time"))
    assert str(x.dtype).startswith("datetime64")
