"""The columnar store behind ``dashboard.data.RunReader`` against TensorBoard's own reader.

Reference: ``EventAccumulator`` (tensorboard.backend.event_processing) reading the same files:
every scalar tag gives the same (wall time, step, value) sequence. The hard cases: several
step layouts interleaved (texts, PSS and configuration tags on some steps only), a live run
whose records arrive between reads, a record cut in half, a corrupt file, NaN and inf values.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dashboard import charts, columns, data
from monitor import schema
from monitor.writer import EventWriter
from tests.dashboard_fixtures import corrupt_at, event_file, layer_names, write_run


def tensorboard_series(run_dir: str) -> dict[str, list[tuple[float, int, float]]]:
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.wall_time, e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def our_series(table) -> dict[str, list[tuple[float, int, float]]]:
    out: dict[str, list] = {}
    for wall, step, metric, layer, value in zip(table["wall_time"], table["step"],
                                                table["metric"], table["layer"], table["value"]):
        tag = f"{metric}/{layer}" if layer else str(metric)
        out.setdefault(tag, []).append((float(wall), int(step), float(value)))
    return out


def assert_same(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for tag, expected in theirs.items():
        got = ours[tag]
        assert [s for _, s, _ in got] == [s for _, s, _ in expected], tag
        np.testing.assert_array_equal([w for w, _, _ in got], [w for w, _, _ in expected])
        np.testing.assert_array_equal([v for _, _, v in got], [v for _, _, v in expected])


def test_every_metric_table_matches_tensorboard(tmp_path):
    run = str(tmp_path / "run")
    write_run(run, n_layers=5, steps=30)  # several layouts: texts, PSS tags, failures
    reader = data.RunReader(run)
    reader.refresh()
    assert len(reader._store.blocks) > 1
    theirs = tensorboard_series(run)
    assert_same(our_series(reader.table()), theirs)
    # one metric at a time (what the views ask for) gives the same rows
    per_metric = {}
    for metric in reader.metrics():
        per_metric.update(our_series(reader.table([metric])))
    assert_same(per_metric, theirs)
    assert set(reader.metrics()) == {t.split("/")[0] if schema.is_layer_tag(t) else t
                                     for t in theirs}
    assert reader.layers("stable_rank") == layer_names(5)


def test_heatmap_from_columns_equals_the_tidy_pivot(tmp_path):
    run = str(tmp_path / "run")
    write_run(run, n_layers=6, steps=25)
    reader = data.RunReader(run)
    reader.refresh()
    layers = list(reversed(layer_names(6))) + ["not.logged"]
    for metric in ("stable_rank", "update_ratio", "sje"):
        steps, z = reader.heatmap(metric, layers)
        ref_steps, ref_z = charts.heatmap_matrix(reader.table([metric]), metric, layers,
                                                 max_steps=10**9)
        np.testing.assert_array_equal(steps, ref_steps)
        np.testing.assert_array_equal(z, ref_z)  # NaN where equal NaN
        assert np.isnan(z[-1]).all()


def test_a_live_run_read_between_writes_matches_tensorboard(tmp_path):
    """Records arrive between reads; each refresh reads only what is new, and a record cut
    in half (the writer mid-write) is read once it is complete."""
    run = str(tmp_path / "run")
    tags = [schema.layer_tag("stable_rank", name) for name in layer_names(4)] + ["train/loss"]
    reader = data.RunReader(run)
    with EventWriter(run) as writer:
        for step in range(40):
            scalars = {t: float(step + i) for i, t in enumerate(tags)}
            if step % 7 == 3:  # another layout now and then
                scalars[schema.TAG_PSS_INTERVENTION] = 1.0
            writer.write(step, scalars, flush=True)
            if step % 5 == 4:
                reader.refresh()
                assert reader.n_values == sum(len(v) for v in our_series(reader.table()).values())
        path = writer.path
        full = open(path, "rb").read()
    with open(path, "r+b") as fh:  # the last record cut in half, as a writer mid-write
        fh.truncate(len(full) - 20)
    reader = data.RunReader(run)
    reader.refresh()
    assert reader.pending_bytes > 0 and 39 not in reader.step_times()[0]
    with open(path, "ab") as fh:
        fh.write(full[-20:])
    assert reader.refresh() == 1
    assert_same(our_series(reader.table()), tensorboard_series(run))
    np.testing.assert_array_equal(reader.step_times()[0], np.arange(40))


def test_incremental_reads_give_what_one_read_gives(tmp_path):
    run = str(tmp_path / "run")
    write_run(run, n_layers=4, steps=20)
    path = event_file(run)
    content = open(path, "rb").read()
    os.remove(path)
    live = data.RunReader(run)
    for cut in np.linspace(0, len(content), 13).astype(int)[1:]:  # cuts inside records too
        with open(path, "wb") as fh:
            fh.write(content[:cut])
        live.refresh()
    assert live.pending_bytes == 0 and not live.errors
    assert_same(our_series(live.table()), tensorboard_series(run))


def test_a_corrupt_file_keeps_what_tensorboard_reads_before_the_damage(tmp_path):
    run = str(tmp_path / "run")
    write_run(run, n_layers=4, steps=12, write_meta=False)
    path = event_file(run)
    corrupt_at(path, offset_from_end=2500)
    reader = data.RunReader(run)
    reader.refresh()
    assert len(reader.errors) == 1 and "corrupt at byte" in reader.errors[0]
    good = int(reader.errors[0].split("corrupt at byte ")[1].split(":")[0])
    clean = tmp_path / "clean"
    clean.mkdir()
    with open(path, "rb") as src, open(clean / os.path.basename(path), "wb") as dst:
        dst.write(src.read(good))  # the records before the damage, read by TensorBoard
    assert_same(our_series(reader.table()), tensorboard_series(str(clean)))


def test_nonfinite_values_are_noted_as_they_arrive(tmp_path):
    run = str(tmp_path / "run")
    write_run(run, n_layers=6, steps=20)  # NaN and inf in layer 2, third-last step
    reader = data.RunReader(run)
    reader.refresh()
    table = reader.table()
    expected = table[~np.isfinite(table["value"].to_numpy())].reset_index(drop=True)
    got = reader.nonfinite_table()
    assert len(expected) >= 2
    assert_same(our_series(got), our_series(expected))


def test_a_resumed_run_drops_what_it_superseded_like_tensorboard(tmp_path):
    run = str(tmp_path / "run")
    write_run(run, n_layers=3, steps=10, every=1)  # steps 0-9, then the job crashed
    later = EventWriter(run, filename_suffix=".resumed")
    later.write_session_start(6)  # resumed from the checkpoint of step 6
    for step in range(6, 12):
        later.write(step, {"train/loss": 100.0 + step, "stable_rank/head.weight": 1.0})
    later.close()
    reader = data.RunReader(run)
    reader.refresh()
    ours, theirs = our_series(reader.table()), tensorboard_series(run)
    assert_same(ours, theirs)
    assert [s for _, s, _ in ours["train/loss"]] == list(range(12))
    steps, z = reader.heatmap("stable_rank", ["head.weight"])
    np.testing.assert_array_equal(steps, np.arange(12))
    assert z[0, -1] == 1.0


def test_blocks_grow_in_chunks_without_copying(monkeypatch):
    monkeypatch.setattr(columns, "CHUNK_BYTES", 64)  # 16 rows a chunk
    store = columns.ColumnStore()
    codes = np.array([store.code("a"), store.code("b")], np.int32)
    for step in range(50):
        store.add(step, 0.5 * step, 0, codes, [step, -step])
    block = store.blocks[0]
    assert len(block._values) == 4 and block.n == 50
    first_chunk = block._values[0]
    store.add(50, 25.0, 0, codes, [50, -50])
    assert block._values[0] is first_chunk  # appending never copies stored rows
    step, wall, code, value = store.rows(np.array([codes[1]]))
    np.testing.assert_array_equal(step, np.arange(51))
    np.testing.assert_array_equal(value, -np.arange(51.0))


@pytest.mark.parametrize("chunk", [100, 4096])
def test_small_read_chunks_give_the_same_columns(tmp_path, monkeypatch, chunk):
    run = str(tmp_path / "run")
    write_run(run, n_layers=3, steps=15)
    monkeypatch.setattr(data, "READ_CHUNK", chunk)
    reader = data.RunReader(run)
    reader.refresh()
    assert_same(our_series(reader.table()), tensorboard_series(run))
    shutil.rmtree(run)


def test_a_layout_seen_once_costs_bytes_not_megabytes():
    """A hostile file with thousands of one-tag layouts: each block starts with 16 rows."""
    store = columns.ColumnStore()
    for i in range(2000):
        store.add(i, 0.0, 0, np.array([store.code(f"tag{i}")], np.int32), [1.0])
    held = sum(c.nbytes for b in store.blocks for c in b._values + b._meta)
    assert len(store.blocks) == 2000 and held < 2000 * 16 * 40
    step, _, code, _ = store.rows(np.array([store.code("tag1999")]))
    assert list(step) == [1999] and list(code) == [1999]
