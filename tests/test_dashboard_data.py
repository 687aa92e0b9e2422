"""The dashboard's event reader against TensorBoard's own, and its failure modes."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from dashboard import data
from monitor import schema
from monitor.writer import EventWriter
from tests.dashboard_fixtures import corrupt_at, event_file, truncate_last_record, write_run
from tests.helpers import read_scalars, read_texts


def as_dict(table) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for metric, layer, step, value in zip(table["metric"], table["layer"], table["step"],
                                          table["value"]):
        tag = f"{metric}/{layer}" if layer else metric
        out.setdefault(tag, {})[int(step)] = float(value)
    return out


def test_reader_matches_event_accumulator(tmp_path):
    run = tmp_path / "run"
    written = write_run(str(run), n_layers=5, steps=12)
    reader = data.RunReader(str(run))
    assert reader.refresh() > 0
    table = reader.table()
    assert tuple(table.columns) == data.COLUMNS
    ours = as_dict(table)
    theirs = read_scalars(str(run))
    assert ours.keys() == theirs.keys()
    for tag, series in theirs.items():
        assert ours[tag].keys() == series.keys(), tag
        np.testing.assert_array_equal([ours[tag][s] for s in series], list(series.values()))
    assert ours[schema.TAG_LOSS] == written[schema.TAG_LOSS]
    layer_rows = table[table["metric"] == "stable_rank"]
    assert set(layer_rows["layer"]) == {"embed.weight", "blocks.0.attn.weight",
                                        "blocks.0.mlp.weight", "blocks.1.attn.weight",
                                        "head.weight"}
    assert set(table[table["metric"] == schema.TAG_LOSS]["layer"]) == {""}


def test_texts_match_tensorboard(tmp_path):
    run = tmp_path / "run"
    write_run(str(run), steps=5)
    reader = data.RunReader(str(run))
    reader.refresh()
    texts = reader.texts()
    expected = read_texts(str(run))[schema.TAG_PSS_CONTROL_TEXT + schema.TEXT_SUFFIX]
    rows = texts[texts["tag"] == schema.TAG_PSS_CONTROL_TEXT]
    assert dict(zip(rows["step"], rows["text"])) == expected


def test_refresh_reads_only_new_events(tmp_path):
    writer = EventWriter(str(tmp_path))
    try:
        for step in range(5):
            writer.write(step, {"train/loss": float(step)})
        reader = data.RunReader(str(tmp_path))
        assert reader.refresh() == 6  # file-version event + 5 steps
        offset = next(iter(reader._files.values())).offset
        version = reader.version
        assert reader.refresh() == 0 and reader.version == version
        for step in range(5, 8):
            writer.write(step, {"train/loss": float(step)})
        assert reader.refresh() == 3
        assert next(iter(reader._files.values())).offset > offset
        assert reader.version == version + 1
        assert list(reader.table()["step"]) == list(range(8))
    finally:
        writer.close()


def test_truncated_last_record_is_retried(tmp_path):
    run = tmp_path / "run"
    write_run(str(run), steps=6, write_meta=False)
    path = event_file(str(run))
    with open(path, "rb") as fh:
        full = fh.read()
    truncate_last_record(path, nbytes=9)
    reader = data.RunReader(str(run))
    reader.refresh()
    assert reader.errors == []
    assert reader.pending_bytes > 0
    assert sorted(set(reader.table()["step"])) == [0, 10, 20, 30, 40]
    with open(path, "ab") as fh:  # the writer finishes the record
        fh.write(full[-9:])
    assert reader.refresh() == 1
    assert reader.pending_bytes == 0
    assert sorted(set(reader.table()["step"]))[-1] == 50


def test_corrupt_file_is_reported_and_earlier_events_kept(tmp_path):
    run = tmp_path / "run"
    write_run(str(run), steps=10, write_meta=False)
    path = event_file(str(run))
    corrupt_at(path, offset_from_end=3000)
    reader = data.RunReader(str(run))
    reader.refresh()
    assert len(reader.errors) == 1
    assert os.path.basename(path) in reader.errors[0] and "corrupt at byte" in reader.errors[0]
    steps = sorted(set(reader.table()["step"]))
    assert steps and steps[0] == 0 and len(steps) < 10
    assert reader.refresh() == 0  # a corrupt file is not re-read


def test_garbage_file_is_reported(tmp_path):
    (tmp_path / "events.out.tfevents.1.host").write_bytes(b"not an event file at all" * 10)
    reader = data.RunReader(str(tmp_path))
    reader.refresh()
    assert reader.errors and "corrupt" in reader.errors[0]
    assert reader.table().empty


def test_discover_runs_and_states(tmp_path):
    assert data.discover_runs(str(tmp_path / "missing")) == []
    assert data.discover_runs(str(tmp_path)) == []
    write_run(str(tmp_path / "a" / "old"), steps=2, status="finished")
    write_run(str(tmp_path / "b"), steps=2, status="running")
    (tmp_path / "waiting").mkdir()
    (tmp_path / "waiting" / schema.RUN_FILENAME).write_text(json.dumps({"status": "running"}))
    (tmp_path / "not-a-run").mkdir()
    runs = {r.name: r for r in data.discover_runs(str(tmp_path))}
    assert set(runs) == {os.path.join("a", "old"), "b", "waiting"}
    assert runs[os.path.join("a", "old")].status == "finished"
    assert runs["b"].status == "live"
    assert runs["waiting"].status == "no events"
    assert runs["b"].layers[0] == "embed.weight"
    now = time.time()
    assert data.run_status({"status": "running"}, now - 1000, True, now) == "stale"
    assert data.run_status({}, now, True, now) == "stale"  # no run.json: not known to be live


def test_resolve_run_dir_stays_inside_logdir(tmp_path):
    logdir = tmp_path / "runs"
    (logdir / "ok").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", logdir / "link")
    assert data.resolve_run_dir(str(logdir), "ok") == str((logdir / "ok").resolve())
    for bad in ("../outside", str(tmp_path / "outside"), "link", "ok/../../outside", "nope"):
        with pytest.raises(ValueError):
            data.resolve_run_dir(str(logdir), bad)


def test_combine_keeps_runs_apart(tmp_path):
    write_run(str(tmp_path / "a"), steps=3)
    write_run(str(tmp_path / "b"), steps=4, n_layers=3)
    tables = []
    for name in ("a", "b"):
        reader = data.RunReader(str(tmp_path / name), name)
        reader.refresh()
        tables.append(reader.table())
    both = data.combine(tables)
    assert len(both) == len(tables[0]) + len(tables[1])
    assert both["run"].value_counts().to_dict() == {"a": len(tables[0]), "b": len(tables[1])}
    assert both["metric"].dtype == "category"


def test_dashboard_never_imports_torch_or_the_training_side():
    """The app, run in bare mode in a fresh interpreter, loads only the monitor's
    standard-library modules (the schema, its safe file reading, the PSS detection rule it
    replays, the alert rules it replays, the reader of its per-step input, and the matching
    of user patterns under a time limit, with ``regex``) and no torch (SPEC 5; STYLE
    principle 3)."""
    import subprocess
    import sys

    code = ("STDLIB_ONLY = {'monitor.schema', 'monitor.safe_io', 'monitor.pss', "
            "'monitor.pss.detect', 'monitor.pss.inputs', 'monitor.alerts', 'monitor.patterns'};"
            "import runpy, sys; sys.argv = ['app', '--logdir', '/nonexistent'];"
            "runpy.run_path('dashboard/app.py', run_name='__main__');"
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.') or "
            "(m.startswith('monitor.') and m not in STDLIB_ONLY));"
            "print('BAD', bad)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "BAD []" in out.stdout, out.stdout


def test_wire_fast_path_is_exact_and_declines_other_layouts():
    from monitor.writer import step_event
    from dashboard.wire import Templates, event_fields

    tags = ["stable_rank/a.weight", "sje/a.weight", "train/loss"]
    first = step_event(0, dict(zip(tags, [1.0, 2.0, 3.0])), wall_time=10.5).SerializeToString()
    templates = Templates()
    templates.learn(first, [0, 1, 2])
    for step, vals in ((7, [0.5, float("nan"), -float("inf")]), (-3, [1e-30, 3e38, 0.0])):
        payload = step_event(step, dict(zip(tags, vals)), wall_time=11.25).SerializeToString()
        wall, got_step, codes, values = templates.decode(payload)
        assert (wall, got_step, list(codes)) == (11.25, step, [0, 1, 2])
        np.testing.assert_array_equal(values, np.float32(vals).astype(np.float64))
    other = step_event(1, {"stable_rank/b.weight": 1.0, "sje/a.weight": 2.0,
                           "train/loss": 3.0}).SerializeToString()  # same size, other tag
    assert templates.decode(other) is None
    with_text = step_event(2, dict(zip(tags, [1.0, 2.0, 3.0])),
                           {"pss/control": "applied"}).SerializeToString()
    assert templates.decode(with_text) is None
    fresh = Templates()
    fresh.learn(with_text, [0, 1, 2])  # a text value: no template is learnt
    assert fresh.decode(first) is None
    assert event_fields(b"\x0a\x05abc") is None  # truncated: declined, the decoder decides


def test_reader_uses_the_fast_path_for_repeated_layouts(tmp_path, monkeypatch):
    from dashboard import wire

    calls = {"fast": 0}
    decode = wire.Templates.decode

    def counting(self, payload):
        out = decode(self, payload)
        calls["fast"] += out is not None
        return out

    monkeypatch.setattr(wire.Templates, "decode", counting)
    written = write_run(str(tmp_path / "run"), steps=30, pss=False)
    reader = data.RunReader(str(tmp_path / "run"))
    reader.refresh()
    assert calls["fast"] >= 25  # all but the first step and those with texts
    ours = as_dict(reader.table())
    assert ours.keys() == written.keys()
    for tag, series in written.items():
        assert ours[tag].keys() == series.keys()
        np.testing.assert_array_equal([ours[tag][k] for k in series], list(series.values()))
