"""Per-layer alerts kept per reader and extended with only the new rows (a live refresh)
give exactly what a full recompute gives, and both match a slow per-layer reference."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from dashboard import alerts, data, explain
from monitor import alerts as rules
from monitor import schema
from tests.test_dashboard_real_monitor import train

LIMITS = alerts.LIMITS


def reference_collapse(steps, x, ratio, settle, floor):
    """First hit of one layer, the rule written out step by step."""
    for t, v in enumerate(x):
        if not np.isfinite(v):
            continue
        before = [u for u in x[:t] if np.isfinite(u)]
        settled = [u for u in x[settle:t] if np.isfinite(u)]
        if (settled and v < ratio * max(settled)) or (v < floor and before and max(before) >= 2 * floor):
            return int(steps[t]), v, max(before)
    return None


def reference_sje(steps, x, threshold, min_steps):
    """(first step, last step, rows, max) of each long run above the threshold, one layer."""
    out, run = [], []
    for t, v in enumerate(list(x) + [-np.inf]):
        if v > threshold:
            run.append(t)
        elif run:
            if len(run) >= min_steps:
                out.append((int(steps[run[0]]), int(steps[run[-1]]), len(run), max(x[run])))
            run = []
    return out


def synthetic(rng, n, k):
    sr = rng.lognormal(1.0, 0.5, (n, k)) * np.linspace(3, 0.4, n)[:, None] ** rng.integers(0, 2, k)
    sje = rng.uniform(0.5, 1.0, (n, k))
    for x in (sr, sje):
        x[rng.random((n, k)) < 0.05] = rng.choice([np.nan, np.inf, -np.inf])
    return np.arange(n) * 5, sr, sje


@pytest.mark.parametrize("seed", range(40))
def test_incremental_rules_over_random_cuts_equal_one_pass_and_the_reference(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 80)), int(rng.integers(1, 7))
    steps, sr, sje = synthetic(rng, n, k)
    layers = [f"layer{j}" for j in range(k)]
    limits = {**LIMITS, "settle": int(rng.integers(0, 10)), "sje_steps": int(rng.integers(1, 5))}
    cuts = sorted(set(rng.integers(0, n + 1, int(rng.integers(1, 6))).tolist()))
    whole = {m: alerts.layer_rule(m, layers, limits) for m in alerts.LAYER_METRICS}
    parts = {m: alerts.layer_rule(m, layers, limits) for m in alerts.LAYER_METRICS}
    for metric, values in ((schema.STABLE_RANK, sr), (schema.SJE, sje)):
        whole[metric].update(steps, values)
        for a, b in zip([0] + cuts, cuts + [n]):
            parts[metric].update(steps[a:b], values[a:b])
        assert parts[metric].alerts("r") == whole[metric].alerts("r")
    found = {a[2]: (a[3], a[4]) for a in whole[schema.STABLE_RANK].alerts("r")}
    for j, name in enumerate(layers):
        ref = reference_collapse(steps, sr[:, j], limits["collapse_ratio"], limits["settle"],
                                 limits["sr_floor"])
        assert found.get(name) == (None if ref is None else (
            ref[0], f"stable rank {ref[1]:.3g}, down from a peak of {ref[2]:.3g}"))
    got = whole[schema.SJE].alerts("r")
    want = [(name, first, f"SJE above {limits['sje_threshold']} for {rows} logged steps "
                          f"(steps {first}-{last}, max {peak:.3g})")
            for j, name in enumerate(layers)
            for first, last, rows, peak in reference_sje(steps, sje[:, j], limits["sje_threshold"],
                                                         limits["sje_steps"])]
    assert [(a[2], a[3], a[4]) for a in got] == want


@pytest.mark.parametrize("seed", range(10))
def test_replayed_rules_over_random_cuts_equal_the_monitors_replay(seed):
    """The job's rules replayed piece by piece (engine carried) == ``monitor.alerts.replay``
    over all steps at once, spikes, NaN and cooldowns included."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    norms = rng.lognormal(0, 0.2, n)
    norms[rng.random(n) < 0.05] *= rng.uniform(5, 50)
    norms[rng.random(n) < 0.01] = np.nan
    steps = np.arange(n) * 2
    tags = [schema.TAG_GLOBAL_GRAD_NORM, schema.TAG_LOSS]
    values = np.c_[norms, rng.random(n)]
    want = rules.replay([(int(s), dict(zip(tags, row))) for s, row in zip(steps, values.tolist())],
                        rules.DEFAULT_RULES)
    state = alerts.Replayed(tags)
    cuts = sorted(set(rng.integers(0, n + 1, 4).tolist()))
    for a, b in zip([0] + cuts, cuts + [n]):
        state.update(steps[a:b], values[a:b])
    assert state.found == want
    assert seed or want, "some seed fires"


def records(path: str) -> list[int]:
    """Byte offsets where each TFRecord of an event file ends."""
    raw, ends, pos = open(path, "rb").read(), [], 0
    while pos < len(raw):
        pos += 12 + int.from_bytes(raw[pos:pos + 8], "little") + 4
        ends.append(pos)
    return ends


def planted_run(run_dir: str, pss: bool) -> str:
    """A run of the real monitor whose middle layer is made rank one after step 12."""
    import torch

    def plant(model, step):
        if step == 12:
            with torch.no_grad():
                w = model[2].weight
                w.copy_(torch.outer(torch.ones(w.shape[0]), torch.randn(w.shape[1])))

    train(run_dir, steps=24, pss=pss, on_step=plant)
    return run_dir


@pytest.fixture(scope="module")
def collapsed_run(tmp_path_factory):
    return planted_run(str(tmp_path_factory.mktemp("collapse") / "run"), pss=False)


@pytest.fixture(scope="module")
def collapsed_pss_run(tmp_path_factory):
    """The same with PSS on: its first step orders the PSS tags differently, so each
    metric's columns live in two blocks."""
    return planted_run(str(tmp_path_factory.mktemp("collapse_pss") / "run"), pss=True)


@pytest.mark.parametrize("pss", [False, True])
def test_alerts_of_a_growing_real_run_equal_a_full_recompute(pss, request, tmp_path):
    """The event file written by the real monitor is copied in random byte pieces (records
    cut in the middle too); after each piece a refresh extends the kept alert state, and the
    alerts equal those recomputed from the whole tidy table of the same rows."""
    run = request.getfixturevalue("collapsed_pss_run" if pss else "collapsed_run")
    src = glob.glob(os.path.join(run, "events.out.tfevents.*"))[0]
    raw = open(src, "rb").read()
    live = tmp_path / "live"
    live.mkdir()
    dst = live / os.path.basename(src)
    reader, state = data.RunReader(str(live), "run"), alerts.RunAlerts()
    rng = np.random.default_rng(0)
    cuts = sorted(set(rng.integers(1, len(raw), 8).tolist()) | {records(src)[3], len(raw)})
    seen_collapse = False
    for cut in cuts:
        dst.write_bytes(raw[:cut])
        reader.refresh()
        kept = state.update(reader)
        logged = reader.metrics()
        assert all(v is not None for k, v in kept.items()
                   if k != alerts.REPLAY or schema.TAG_GLOBAL_GRAD_NORM in logged), \
            "the monitor's layout is read incrementally"
        full = alerts.find_alerts(reader.table())
        per_layer = full[full["kind"].isin(["stable rank collapse", "SJE sustained"])]
        got = alerts.alerts_in(lambda *m: reader.table(m), reader.metrics(),
                               reader.nonfinite_table(), kept={"run": kept})
        assert got.equals(alerts.alerts_in(lambda *m: reader.table(m), reader.metrics(),
                                           reader.nonfinite_table()))
        assert sorted(map(tuple, got[got["kind"].isin(per_layer["kind"])].to_numpy().tolist())) == \
            sorted(map(tuple, per_layer.to_numpy().tolist()))
        seen_collapse |= bool(((got["kind"] == "stable rank collapse") & (got["layer"] == "2.weight")
                               & (got["step"] == 13)).any())  # the first step logged after
    assert seen_collapse or pss, "the planted collapse is found at its step"
    if pss:
        assert len({b for b in reader._store.blocks if b.n > 0}) > 2, "several layouts read"


def test_a_restart_falls_back_to_the_full_recompute(collapsed_run, tmp_path):
    reader = data.RunReader(collapsed_run, "run")
    reader.refresh()
    reader._store.restarts.append((1, 5))  # what a resumed job's SessionLog.START notes
    assert reader.layer_rows(schema.STABLE_RANK) is None
    assert all(v is None for v in alerts.RunAlerts().update(reader).values())


def test_the_charts_draw_the_rules_own_thresholds():
    """Before, ``explain`` read the defaults from a signature that had none (``**limits``)
    and fell back to copies of them."""
    assert explain.ALERT["sje_threshold"] == alerts.LIMITS["sje_threshold"] == 0.8
    assert explain.ALERT["sr_floor"] == alerts.LIMITS["sr_floor"]


def test_movement_and_line_rows_from_the_columns_equal_the_tidy_table_path(collapsed_run):
    """What the Layers view now reads per version (movement from the columns, the drawn
    layers' rows only) equals what it read from the whole metric's tidy table."""
    from dashboard import transforms

    reader = data.RunReader(collapsed_run, "run")
    reader.refresh()
    for metric in (schema.STABLE_RANK, schema.UPDATE_RATIO):  # update_ratio: NaN where w = 0
        layers = reader.layers(metric)
        whole = reader.table([metric])
        by_table = transforms.movement(whole, metric)
        by_columns = transforms.movement_of(layers, reader.heatmap(metric, layers)[1])
        assert list(by_columns.index) == list(by_table.index)
        np.testing.assert_array_equal(by_columns.to_numpy(), by_table.to_numpy())
        picked = layers[1:3]
        some = reader.table([metric], picked)
        want = whole[whole["layer"].isin(picked)].reset_index(drop=True)
        assert len(some) == len(want) > 0
        for col in ("step", "wall_time", "value"):
            np.testing.assert_array_equal(some[col].to_numpy(), want[col].to_numpy())
        assert list(some["layer"].astype(str)) == list(want["layer"].astype(str))


def test_rows_of_some_layers_keep_the_runs_of_the_whole_table(tmp_path):
    """A line chart colours by run index: the drawn layers' rows must list the same runs as
    the whole metric's table, also when the first run lacks those layers."""
    from dashboard import cache, charts
    from dashboard.views import Context
    from tests.dashboard_fixtures import layer_names, write_run

    write_run(str(tmp_path / "a"), n_layers=2, steps=20)
    write_run(str(tmp_path / "b"), n_layers=6, steps=20)
    runs = [r for r in data.discover_runs(str(tmp_path))]
    key, readers = cache.load(str(tmp_path), runs)
    ctx = Context(str(tmp_path), runs, key, readers, charts.Style())
    only_b = [layer_names(6)[3]]  # blocks.1.attn.weight: not in a run of 2 layers
    some, whole = ctx.rows(schema.STABLE_RANK, layers=only_b), ctx.rows(schema.STABLE_RANK)
    assert list(some["run"].cat.categories) == list(whole["run"].cat.categories)
    assert set(some["run"].astype(str)) == {"b"}
    fig_some = charts.lines_figure(some, schema.STABLE_RANK, only_b)
    fig_whole = charts.lines_figure(whole, schema.STABLE_RANK, only_b)
    assert [t.line.color for t in fig_some.data] == [t.line.color for t in fig_whole.data]
    assert [t.name for t in fig_some.data] == [t.name for t in fig_whole.data]


def test_column_tail_across_layouts_positions_and_refusals():
    """``ColumnStore.tail``: rows of several layouts merged in arrival order, continued from
    a position, read afresh when a new layout holds the tags, refused (None) when the tags'
    order differs between layouts or a step goes back."""
    from dashboard.columns import ColumnStore

    store = ColumnStore()
    a, b, x, y = (store.code(t) for t in ("m/a", "m/b", "x", "y"))
    first, rest = np.array([x, a, b]), np.array([a, b, y])
    store.add(0, 0.0, 0, first, [9, 1, 2])
    for step in (1, 2):
        store.add(step, 0.0, 0, rest, [step + 1, step + 2, 7])
    codes = np.array([a, b])
    fresh, pos, order, steps, values = store.tail(codes)
    assert fresh and list(order) == [a, b] and list(steps) == [0, 1, 2]
    np.testing.assert_array_equal(values, [[1, 2], [2, 3], [3, 4]])
    store.add(3, 0.0, 0, rest, [4, 5, 7])
    store.add(4, 0.0, 0, first, [9, 5, 6])
    fresh, pos, _, steps, values = store.tail(codes, pos)
    assert not fresh and list(steps) == [3, 4]
    np.testing.assert_array_equal(values, [[4, 5], [5, 6]])
    assert len(store.tail(codes, pos)[3]) == 0  # nothing new
    store.add(5, 0.0, 0, np.array([a, b]), [1, 1])  # a third layout: read afresh
    fresh, pos, _, steps, _ = store.tail(codes, pos)
    assert fresh and list(steps) == [0, 1, 2, 3, 4, 5]
    store.add(5, 0.0, 0, rest, [1, 1, 1])  # step 5 again
    assert store.tail(codes, pos) is None and store.tail(codes) is None
    other = ColumnStore()
    a, b = other.code("m/a"), other.code("m/b")
    other.add(0, 0.0, 0, np.array([a, b]), [1, 2])
    other.add(1, 0.0, 0, np.array([b, a]), [1, 2])  # the tags' order differs
    assert other.tail(np.array([a, b])) is None
