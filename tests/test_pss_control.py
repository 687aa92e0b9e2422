"""Live control: the schema, the atomic writer, the watcher and a fuzz of malformed files."""

from __future__ import annotations

import json
import os
import threading

import pytest

from monitor.pss.control import ControlWatcher
from monitor.schema import (ControlError, ControlFile, PSSConfig, control_path, read_control,
                            write_control)


def test_pssconfig_rejects_bad_values_naming_the_field():
    cases = [({"tau": 0.5}, "tau"), ({"tau": -1}, "tau"), ({"alpha": 0}, "alpha"),
             ({"alpha": 1.5}, "alpha"), ({"warmup_steps": -1}, "warmup_steps"),
             ({"method": "median"}, "method"), ({"window": 2}, "window"),
             ({"temperature": -1.0}, "temperature"), ({"c": 0}, "c"), ({"layers": "("}, "layers"),
             ({"enabled": "yes"}, "enabled"), ({"k_max": 0}, "k_max"), ({"tau": float("nan")}, "tau"),
             ({"tau": True}, "tau"), ({"k_min": 0}, "k_min"), ({"k_min": 2.0}, "k_min"),
             ({"k_min": True}, "k_min"), ({"k_min": 65}, r"k_min: 65 .* \[1, k_max = 64\]"),
             ({"k_min": 3, "k_max": 2}, "k_min")]
    for change, field in cases:
        with pytest.raises(ControlError, match=field):
            PSSConfig(**change)
    with pytest.raises(ControlError, match="unknown PSS setting"):
        PSSConfig.from_dict({"tua": 3.0})


def test_k_min_travels_through_the_control_file(tmp_path):
    assert PSSConfig().k_min == 2  # SPEC 3, our reading: k = max(2, floor(SR))
    write_control(tmp_path, PSSConfig(k_min=2))
    assert read_control(tmp_path).settings.k_min == 2
    old = {"version": 3, "settings": {"tau": 3.0}}  # written before k_min existed
    assert ControlFile.from_json(json.dumps(old)).settings.k_min == 2  # today's default
    with pytest.raises(ControlError, match="k_min: 0 is not allowed"):
        ControlFile.from_json(json.dumps({"version": 4, "settings": {"k_min": 0}}))


def test_write_control_is_atomic_versioned_and_round_trips(tmp_path):
    first = write_control(tmp_path, PSSConfig(tau=3.0))
    second = write_control(tmp_path, PSSConfig(tau=4.0, method="log"), smooth_now=True)
    assert (first.version, second.version, second.smooth_now) == (1, 2, 1)
    back = read_control(tmp_path)
    assert back == second and back.settings.method == "log"
    assert os.listdir(tmp_path) == ["control.json"]  # no temp file left behind
    with pytest.raises(TypeError):
        write_control(tmp_path, {"tau": 3.0})


MALFORMED = [
    ("truncated JSON", '{"version": 5, "settings": {"tau": 3.0'),
    ("not an object", "[1, 2, 3]"),
    ("wrong type", '{"version": 5, "settings": {"tau": "high"}}'),
    ("unknown key", '{"version": 5, "settings": {"tau": 3.0, "taus": 2}}'),
    ("unknown top-level key", '{"version": 5, "settings": {}, "extra": 1}'),
    ("negative tau", '{"version": 5, "settings": {"tau": -2.5}}'),
    ("version missing", '{"settings": {"tau": 3.0}}'),
    ("binary garbage", "\x00\xff\xfe garbage"),
    ("empty file", ""),
]


@pytest.mark.parametrize("name,text", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_watcher_rejects_malformed_files_and_keeps_settings(tmp_path, name, text):
    write_control(tmp_path, PSSConfig(tau=3.0))
    watcher = ControlWatcher(str(tmp_path), check_every=1)
    update = watcher.poll(0)
    assert update.version == 1 and update.settings.tau == 3.0
    with open(control_path(tmp_path), "w", encoding="utf-8", errors="surrogateescape") as fh:
        fh.write(text)
    update = watcher.poll(1)
    assert update is not None and update.rejected and update.settings is None, name
    assert watcher.version == 1
    assert watcher.poll(2) is None  # the same bad file is reported once
    write_control(tmp_path, PSSConfig(tau=4.0))  # a good file after a bad one is taken
    assert watcher.poll(3).settings.tau == 4.0


def test_watcher_checks_at_most_every_few_steps_and_handles_smooth_now(tmp_path):
    watcher = ControlWatcher(str(tmp_path), check_every=5)
    assert watcher.poll(0) is None  # no file yet
    write_control(tmp_path, PSSConfig(alpha=0.2))
    assert watcher.poll(3) is None  # not a checking step
    assert watcher.poll(5).settings.alpha == 0.2
    write_control(tmp_path, PSSConfig(alpha=0.2), smooth_now=True)
    update = watcher.poll(10)
    assert update.smooth_now and update.version == 2
    path = control_path(tmp_path)
    data = json.loads(open(path).read())
    open(path, "w").write(json.dumps(data))  # the same content again (a touch): nothing new
    assert watcher.poll(15) is None
    data["version"] = 1  # a lower version: the file written anew, its request ids too
    open(path, "w").write(json.dumps(data))
    update = watcher.poll(20)
    assert update.version == 1 and update.smooth_now and "lower than 2" in update.note


def test_file_replaced_mid_read_never_raises(tmp_path):
    write_control(tmp_path, PSSConfig())
    watcher = ControlWatcher(str(tmp_path), check_every=1)
    stop = threading.Event()

    def hammer():
        i = 0
        while not stop.is_set():
            i += 1
            if i % 3 == 0:  # a non-atomic writer: truncated content visible mid-write
                with open(control_path(tmp_path), "w") as fh:
                    fh.write('{"version": 99, "settings": {"ta')
            else:
                write_control(tmp_path, PSSConfig(tau=2.0 + (i % 7)))

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        results = [watcher.poll(step) for step in range(400)]
    finally:
        stop.set()
        thread.join()
    applied = [r for r in results if r is not None and r.settings is not None]
    assert applied, "no version was ever applied"
    assert all(isinstance(r.settings, PSSConfig) for r in applied)
    assert all(r.rejected for r in results if r is not None and r.settings is None and not r.smooth_now)


def test_control_file_json_is_stable():
    text = ControlFile(version=3, settings=PSSConfig(tau=3.5), smooth_now=2).to_json()
    assert ControlFile.from_json(text) == ControlFile(version=3, settings=PSSConfig(tau=3.5), smooth_now=2)
