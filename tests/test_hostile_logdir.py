"""Hostile log directories for the dashboard (issue 15): special files where it reads, runs
without events beside runs with events, control files the PSS page cannot use.

The dashboard must name each problem and go on showing the rest; nothing may block it
(a FIFO opened for reading waits for a writer for ever) or raise through a view.
"""

from __future__ import annotations

import json
import os

import pytest
from streamlit.testing.v1 import AppTest

from dashboard import data
from monitor import schema
from tests.dashboard_fixtures import write_meta_file, write_run
from tests.test_dashboard_app import VIEWS, show, texts
from tests.test_dashboard_app import open_app as _open_app
from tests.test_hostile_control import HOSTILE, within

EVENTS = "events.out.tfevents."


def open_app(logdir, monkeypatch, timeout: float = 20) -> AppTest:
    """The dashboard's AppTest opener with a short timeout: a special file that blocked a
    reader would run past it."""
    return _open_app(logdir, monkeypatch, timeout)


@pytest.fixture
def hostile_logdir(tmp_path):
    """A good run with special files among its event files, and runs with odd run.json."""
    good = tmp_path / "good"
    write_run(str(good), steps=20)
    os.mkfifo(good / f"{EVENTS}9000000001.fifo")
    os.symlink("/dev/zero", good / f"{EVENTS}9000000002.zero")
    os.mkdir(good / f"{EVENTS}9000000003.dir")
    for name, make in {
        "runjson_fifo": lambda p: os.mkfifo(p),
        "runjson_dev_zero": lambda p: os.symlink("/dev/zero", p),
        "runjson_50mb": lambda p: open(p, "wb").truncate(50 * 2**20),
        "runjson_deep": lambda p: open(p, "wb").write(b"[" * 50_000 + b"]" * 50_000),
        "runjson_utf16": lambda p: open(p, "wb").write(json.dumps({"status": "running"})
                                                       .encode("utf-16")),
        "runjson_odd_types": lambda p: open(p, "w").write(json.dumps(
            {"status": ["x"], "layers": "abc", "config": [1], "pss": 5})),
    }.items():
        run = tmp_path / name
        write_run(str(run), steps=5, write_meta=False)
        make(run / schema.RUN_FILENAME)
    return tmp_path


def test_readers_refuse_special_files_without_blocking(hostile_logdir):
    runs = within(10, data.discover_runs, str(hostile_logdir))
    assert len(runs) == 7
    assert all(r.meta == {} for r in runs if r.name.startswith("runjson_") and "odd" not in r.name)
    good = next(r for r in runs if r.name == "good")
    reader = data.RunReader(good.path, good.name)
    within(10, reader.refresh)
    problems = "\n".join(reader.errors)
    for phrase in ("is a FIFO", "is a character device", "is a directory"):
        assert phrase in problems, problems
    assert len(reader.errors) == 3 and not reader.table().empty  # the good file is read


def test_every_view_survives_the_hostile_log_directory(hostile_logdir, monkeypatch):
    at = open_app(hostile_logdir, monkeypatch)
    at.sidebar.multiselect(key="runs").set_value(["good", "runjson_odd_types"]).run()
    for view in VIEWS:
        show(at, view)
        assert "is a FIFO" in texts(at.error), view


def test_a_run_without_events_is_compared_with_one_that_has_them(tmp_path, monkeypatch):
    write_run(str(tmp_path / "with_events"), steps=10)
    (tmp_path / "starting").mkdir()
    write_meta_file(str(tmp_path / "starting"), ["w"], "running")  # run.json only
    readers = [data.RunReader(str(tmp_path / n), n) for n in ("with_events", "starting")]
    for reader in readers:
        reader.refresh()
    tables = [r.table() for r in readers]
    assert len(tables[0]) and tables[1].empty
    both = data.combine(tables)
    assert len(both) == len(tables[0]) and set(both["run"]) == {"with_events"}
    assert data.combine(tables[::-1]).equals(both)
    at = open_app(tmp_path, monkeypatch)
    at.sidebar.multiselect(key="runs").set_value(["with_events", "starting"]).run()
    for view in VIEWS:
        show(at, view)
        assert "dtype of categories" not in texts(at.error)


UNUSABLE = ["utf16_valid_json", "invalid_utf8", "deep_objects", "warmup_above_2_53",
            "k_max_2_60", "window_huge", "version_10_400"]


def test_pss_page_shows_a_message_for_each_unusable_control_file(tmp_path, monkeypatch):
    """UTF-16, invalid UTF-8 and deep nesting raised on render; integers above 2^53 made the
    form raise StreamlitJSNumberBoundsError."""
    write_run(str(tmp_path / "run"), steps=10)
    path = tmp_path / "run" / schema.CONTROL_FILENAME
    at = show(open_app(tmp_path, monkeypatch), "PSS control")
    for name in UNUSABLE:
        path.write_bytes(HOSTILE[name][0])
        at.run()
        assert not at.exception, (name, [e.value for e in at.exception])
        assert "control.json is invalid" in texts(at.error), (name, texts(at.error))
    at.button(key="pss_apply").click().run()  # the repair
    assert not at.exception and schema.read_control(tmp_path / "run").version == 1


def test_pss_page_with_a_special_control_file(tmp_path, monkeypatch):
    write_run(str(tmp_path / "run"), steps=10)
    path = tmp_path / "run" / schema.CONTROL_FILENAME
    os.mkfifo(path)
    at = show(open_app(tmp_path, monkeypatch), "PSS control")  # a FIFO blocked it for good
    assert "is a FIFO" in texts(at.error)
    at.button(key="pss_apply").click().run()  # the FIFO entry is replaced by a regular file
    assert not at.exception and schema.read_control(tmp_path / "run").version == 1
    path.unlink()
    path.mkdir()
    at.run()
    assert "is a directory" in texts(at.error)
    at.button(key="pss_apply").click().run()  # IsADirectoryError went through the page
    assert not at.exception, [e.value for e in at.exception]
    assert "control.json was not written" in texts(at.error) and path.is_dir()


def test_a_file_given_as_the_log_directory_is_named_as_such(tmp_path, monkeypatch):
    afile = tmp_path / "runs"
    afile.write_text("not a directory")
    at = open_app(afile, monkeypatch)
    assert "is a file, not a directory" in texts(at.error)
    assert "does not exist" not in texts(at.warning)


def test_event_files_are_read_in_bounded_chunks_with_the_same_result(tmp_path, monkeypatch):
    write_run(str(tmp_path / "run"), steps=30)
    whole = data.RunReader(str(tmp_path / "run"))
    whole.refresh()
    monkeypatch.setattr(data, "READ_CHUNK", 100)  # smaller than most records
    chunked = data.RunReader(str(tmp_path / "run"))
    chunked.refresh()
    assert chunked.table().equals(whole.table()) and chunked.texts().equals(whole.texts())
    assert not chunked.errors and chunked.pending_bytes == 0


def test_a_huge_event_file_costs_one_chunk_of_memory(tmp_path):
    """A 1 GiB file of zeros was read whole (and /dev/zero until MemoryError)."""
    import struct
    import tracemalloc

    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    run = tmp_path / "run"
    write_run(str(run), steps=3)
    with open(run / f"{EVENTS}9000000001.zeros", "wb") as fh:
        fh.truncate(2**30)  # sparse: no disk
    header = struct.pack("<Q", 2**40)  # a valid header claiming a 1 TiB record
    with open(run / f"{EVENTS}9000000002.claim", "wb") as fh:
        fh.write(header + struct.pack("<I", masked_crc32c(header)))
        fh.truncate(data.READ_CHUNK + 2**20)
    reader = data.RunReader(str(run))
    tracemalloc.start()
    within(30, reader.refresh)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 * data.READ_CHUNK, peak
    problems = "\n".join(reader.errors)
    assert "zeros is corrupt at byte 0" in problems and "more than 268,435,456" in problems
    assert not reader.table().empty
