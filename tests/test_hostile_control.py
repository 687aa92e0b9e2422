"""Hostile and careless control files (issue 15), fuzz-style and fast.

Each case is a file that a careless user (PowerShell's ``>``, a hand edit) or a hostile one
could put at ``<run>/control.json``. Every one must be refused with a message naming the
problem, never raise anything else, never block, never be read whole when huge; the
advertised repair (``write_control``, the dashboard's Apply) must work over each; and a
training job with PSS must survive each, at start and mid-run, then take the repair.
"""

from __future__ import annotations

import json
import math
import os
import threading

import pytest
import torch
from torch import nn

import monitor
from monitor import schema
from monitor.pss.control import ControlWatcher
from monitor.schema import ControlError, ControlFile, PSSConfig, read_control, write_control
from tests.helpers import read_scalars, read_texts


def _control(**fields) -> bytes:
    body = {"version": 1, "smooth_now": 0, "settings": {}}
    body.update(fields)
    return json.dumps(body).encode()


def _settings(**values) -> bytes:
    return _control(settings=values)


#: name -> (content, a phrase the refusal must contain)
HOSTILE = {
    "binary": (bytes(range(256)) * 8, "not UTF-8"),
    "utf16_bom_fragment": (b"\xff\xfe{", "UTF-16-LE"),  # the repro
    "utf16_valid_json": (ControlFile(version=3).to_json().encode("utf-16"), "UTF-16"),
    "utf32": (ControlFile(version=3).to_json().encode("utf-32"), "UTF-32"),
    "invalid_utf8": (b'{"version": 1, "settings": {"layers": "\xc3\x28"}}', "byte 0xC3"),
    "deep_lists": (b"[" * 30_000 + b"]" * 30_000, "nests 30000 levels"),
    "deep_objects": (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "nests 10000 levels"),
    "deep_in_settings": (b'{"version": 1, "settings": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                         "nests"),
    "version_10_400": (b'{"version": 1' + b"0" * 400 + b"}", "version: 1000"),
    "version_5000_digits": (b'{"version": ' + b"9" * 5000 + b"}", "not valid JSON"),
    "version_above_2_24": (_control(version=2**24 + 1), "version: 16777217"),
    "version_float32_rounded": (_control(version=1796012395), "version: 1796012395"),
    "smooth_now_huge": (_control(smooth_now=2**63), "smooth_now"),
    "warmup_above_2_53": (_settings(warmup_steps=2**53 + 1), "warmup_steps"),
    "k_max_2_60": (_settings(k_max=2**60), "k_max"),
    "window_huge": (_settings(window=2**63 + 1), "window"),
    "tau_10_400": (b'{"version": 1, "settings": {"tau": 1' + b"0" * 400 + b"}}", "tau"),
    "tau_nan": (b'{"version": 1, "settings": {"tau": NaN}}', "tau: nan"),
    "alpha_infinity": (b'{"version": 1, "settings": {"alpha": Infinity}}', "alpha: inf"),
    "c_subnormal": (_settings(method="log", c=5e-324), "c: 5e-324"),
    "version_string": (_control(version="1"), "version: '1'"),
    "version_bool": (_control(version=True), "version: True"),
    "settings_list": (_control(settings=[1]), "must be a JSON object"),
    "method_number": (_settings(method=5), "method: 5"),
    "enabled_string": (_settings(enabled="true"), "enabled: 'true'"),
    "layers_list": (_settings(layers=["x"]), "layers"),
    "layers_deep_regex": (_settings(layers="(" * 450 + ")" * 450), None),  # valid or refused
    "layers_too_long": (_settings(layers="a" * 5000), "at most 1000 characters"),
    "unknown_key": (_control(extra=1), "unknown top-level key"),
    "null": (b"null", "must hold a JSON object"),
    "empty": (b"", "not valid JSON"),
    "truncated": (b'{"version": 2, "settings": {"ta', "not valid JSON"),
}


def _write(path, content: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(content)


def within(seconds: float, fn, *args):
    """``fn(*args)`` in a thread; fails the test if it has not returned in ``seconds``
    (a FIFO opened for reading blocks until a writer comes: forever)."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            out["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} blocked for {seconds} s"
    if "error" in out:
        raise out["error"]
    return out.get("value")


# ---------------------------------------------------------------------------------------
# special files at <run>/control.json
# ---------------------------------------------------------------------------------------

def make_special(kind: str, run_dir: str, elsewhere: str) -> str:
    """Put a special file at ``run_dir/control.json``; returns the phrase its refusal names."""
    path = os.path.join(run_dir, schema.CONTROL_FILENAME)
    if kind == "directory":
        os.mkdir(path)
        return "is a directory"
    if kind == "fifo":
        os.mkfifo(path)
        return "FIFO"
    if kind == "symlink_dev_zero":
        os.symlink("/dev/zero", path)
        return "symbolic link"
    if kind == "symlink_to_valid_file":  # another run's (or user's) file must not steer this job
        other = os.path.join(elsewhere, "other_control.json")
        _write(other, ControlFile(version=7, settings=PSSConfig(tau=9.0)).to_json().encode())
        os.symlink(other, path)
        return "symbolic link"
    if kind == "file_50mb":
        with open(path, "wb") as fh:
            fh.truncate(50 * 2**20)  # sparse: costs no disk
        return "52,428,800 bytes"
    raise ValueError(kind)


SPECIAL = ("directory", "fifo", "symlink_dev_zero", "symlink_to_valid_file", "file_50mb")


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_content_is_refused_with_a_named_reason(tmp_path, name):
    content, phrase = HOSTILE[name]
    _write(tmp_path / schema.CONTROL_FILENAME, content)
    try:
        result = within(5, read_control, tmp_path)
    except ControlError as err:  # nothing but ControlError may come out
        assert phrase is None or phrase in str(err), str(err)
        assert len(str(err)) < 2000  # a 60 kB value is shown shortened
    else:
        assert phrase is None and isinstance(result, ControlFile), name


@pytest.mark.parametrize("kind", SPECIAL)
def test_special_files_are_refused_without_blocking(tmp_path, kind):
    run = tmp_path / "run"
    run.mkdir()
    phrase = make_special(kind, str(run), str(tmp_path))
    with pytest.raises(ControlError, match=phrase):
        within(5, read_control, run)


def test_a_huge_control_file_is_not_read(tmp_path, monkeypatch):
    from monitor import safe_io

    make_special("file_50mb", str(tmp_path), str(tmp_path))
    read = []
    real_read = os.read
    monkeypatch.setattr(safe_io.os, "read", lambda fd, n: read.append(n) or real_read(fd, n))
    watcher = ControlWatcher(str(tmp_path), check_every=1)
    assert "52,428,800 bytes" in watcher.poll(0).rejected
    assert watcher.poll(1) is None  # unchanged: not even re-opened
    assert read == []  # refused on its size, before any read


@pytest.mark.parametrize("name", sorted(HOSTILE) + list(SPECIAL))
def test_write_control_repairs_every_hostile_file(tmp_path, name):
    run = tmp_path / "run"
    run.mkdir()
    if name in HOSTILE:
        _write(run / schema.CONTROL_FILENAME, HOSTILE[name][0])
    else:
        make_special(name, str(run), str(tmp_path))
    if name == "directory":  # a person put it there: it is not removed, and the error says so
        with pytest.raises(ControlError, match="is a directory"):
            write_control(run, PSSConfig(tau=4.0))
        return
    written = within(5, write_control, run, PSSConfig(tau=4.0))
    assert 1 <= written.version <= 4  # small, never the Unix time (float32 would round it)
    assert read_control(run) == written
    assert (run / schema.CONTROL_FILENAME).is_file() and not os.path.islink(
        run / schema.CONTROL_FILENAME)
    if name == "symlink_to_valid_file":  # the link was replaced, its target left alone
        assert json.loads((tmp_path / "other_control.json").read_text())["version"] == 7


def test_legible_version_survives_utf16_damage(tmp_path):
    _write(tmp_path / schema.CONTROL_FILENAME, ControlFile(version=5).to_json().encode("utf-16"))
    assert write_control(tmp_path, PSSConfig()).version == 6


def test_integers_are_bounded_so_floats_and_the_form_stay_exact():
    big = {"warmup_steps": 2**53 + 1, "window": 2**53 + 1, "k_max": 2**53 + 1}
    for name, value in big.items():
        with pytest.raises(ControlError, match=name):
            PSSConfig(**{name: value})
    cfg = PSSConfig(warmup_steps=schema.MAX_SETTING_INT, k_max=schema.MAX_SETTING_INT,
                    window=schema.MAX_SETTING_INT)
    assert all(float(v) == v for v in (cfg.warmup_steps, cfg.k_max, cfg.window))
    with pytest.raises(ControlError, match="tau"):
        PSSConfig(tau=10**400)  # math.isfinite(10**400) raises OverflowError
    top = ControlFile(version=schema.MAX_VERSION, smooth_now=schema.MAX_VERSION)
    assert float(torch.tensor(float(top.version), dtype=torch.float32)) == top.version


# ---------------------------------------------------------------------------------------
# the job: hostile files at start and mid-run, deletion, acknowledgement
# ---------------------------------------------------------------------------------------

def tiny_job(logdir, pss=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    config = monitor.MonitorConfig.preset("cheap", every=1)
    mon = monitor.watch(model, opt, logdir=str(logdir), config=config, pss=pss)
    x = torch.randn(16, 6)

    def step():
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()

    return model, mon, step


def control_notes(logdir) -> str:
    return "\n".join(read_texts(str(logdir)).get(schema.TAG_PSS_CONTROL_TEXT + "/text_summary",
                                                 {}).values())


JOB_CASES = ["utf16_bom_fragment", "deep_lists", "version_10_400", "version_above_2_24",
             "warmup_above_2_53", "c_subnormal", "invalid_utf8", *SPECIAL]


@pytest.mark.parametrize("name", JOB_CASES)
def test_the_job_survives_each_hostile_file_and_takes_the_repair(tmp_path, name):
    run = tmp_path / "run"
    run.mkdir()
    if name in HOSTILE:
        _write(run / schema.CONTROL_FILENAME, HOSTILE[name][0])
        phrase = HOSTILE[name][1]
    else:
        phrase = make_special(name, str(run), str(tmp_path))
    model, mon, step = within(20, tiny_job, run)  # a FIFO at start blocked watch() for good
    for _ in range(6):
        within(20, step)
    if name != "directory":
        written = write_control(run, PSSConfig(tau=7.0))  # the advertised repair
    for _ in range(6):
        within(20, step)
    mon.close()
    notes = control_notes(run)
    assert "refused at start" in notes and phrase in notes, notes
    scalars = read_scalars(str(run))
    assert len(scalars[schema.TAG_PSS_TRIGGER_RATIO]) == 12  # PSS ran at every step
    if name != "directory":
        assert scalars[schema.TAG_PSS_TAU][11] == 7.0
        assert scalars[schema.TAG_PSS_CONTROL_VERSION][11] == written.version
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["fifo", "symlink_dev_zero", "file_50mb", "deep_objects"])
def test_a_hostile_file_mid_run_is_reported_once_and_the_settings_stay(tmp_path, name):
    model, mon, step = tiny_job(tmp_path, pss=PSSConfig(tau=3.0))
    for _ in range(3):
        step()
    os.unlink(tmp_path / schema.CONTROL_FILENAME)
    if name in HOSTILE:
        _write(tmp_path / schema.CONTROL_FILENAME, HOSTILE[name][0])
    else:
        make_special(name, str(tmp_path), str(tmp_path / ".."))
    for _ in range(12):
        within(20, step)
    mon.close()
    notes = control_notes(tmp_path)
    assert notes.count("control.json rejected") == 1, notes  # once per change of the file
    assert set(read_scalars(str(tmp_path))[schema.TAG_PSS_TAU].values()) == {3.0}


def test_versions_restarted_after_deletion_are_applied_and_acknowledged(tmp_path):
    model, mon, step = tiny_job(tmp_path)
    write_control(tmp_path, PSSConfig(tau=3.0))  # version 2
    write_control(tmp_path, PSSConfig(tau=4.0), smooth_now=True)  # version 3, request 1
    for _ in range(6):
        step()
    os.unlink(tmp_path / schema.CONTROL_FILENAME)
    for _ in range(5):
        step()
    written = write_control(tmp_path, PSSConfig(tau=5.0), smooth_now=True)
    assert (written.version, written.smooth_now) == (1, 1)
    for _ in range(10):
        step()
    mon.close()
    scalars = read_scalars(str(tmp_path))
    assert scalars[schema.TAG_PSS_TAU][20] == 5.0
    assert scalars[schema.TAG_PSS_CONTROL_VERSION][20] == 1.0
    fired = [s for s, v in scalars[schema.TAG_PSS_INTERVENTION].items() if v == 1.0]
    assert fired == [0, 15]  # request 1, then request 1 again in the file written anew
    assert "lower than 3" in control_notes(tmp_path)


def test_the_largest_version_is_acknowledged_exactly(tmp_path):
    """``pss/control_version`` is a float32: exact up to MAX_VERSION = 2^24, which bounds it."""
    model, mon, step = tiny_job(tmp_path)
    path = tmp_path / schema.CONTROL_FILENAME
    _write(path, ControlFile(version=schema.MAX_VERSION, settings=PSSConfig(tau=3.5)).to_json()
           .encode())
    for _ in range(6):
        step()
    after = write_control(tmp_path, PSSConfig(tau=4.5))
    assert after.version == 1  # the counter starts again, and the job takes it
    for _ in range(5):
        step()
    mon.close()
    acks = read_scalars(str(tmp_path))[schema.TAG_PSS_CONTROL_VERSION]
    assert acks[5] == schema.MAX_VERSION and acks[10] == 1.0


def test_a_non_finite_smoothing_result_is_never_written(tmp_path, monkeypatch):
    from monitor.pss import controller

    with pytest.raises(ControlError, match="c: 5e-324"):
        PSSConfig(method="log", c=5e-324)
    from monitor.pss.smoothing import smoothing_function
    with pytest.raises(ValueError, match="c=5e-324"):
        smoothing_function(torch.tensor([5.0, 1.0]), "log", c=5e-324)

    def nan_smooth(M, method, **kw):
        return torch.full_like(M, math.nan), {"k": 1.0, "sr_before": 1.0, "sr_after": 1.0,
                                              "sigma_before": 1.0, "sigma_after": 1.0}

    monkeypatch.setattr(controller, "smooth_matrix", nan_smooth)
    model, mon, step = tiny_job(tmp_path, pss=PSSConfig(warmup_steps=0))
    step()
    before = [p.detach().clone() for p in model.parameters()]
    write_control(tmp_path, PSSConfig(warmup_steps=0), smooth_now=True)
    for _ in range(5):
        step()  # the request is taken at step 5, before that step's update
    kept = [p.detach().clone() for p in model.parameters()]
    mon.close()
    assert all(torch.isfinite(p).all() for p in kept)
    events = "\n".join(read_texts(str(tmp_path))[schema.TAG_PSS_EVENTS + "/text_summary"].values())
    assert "non-finite entries; the weight was kept" in events
    assert len(before) == len(kept)


def test_special_files_where_the_job_writes_never_block_it(tmp_path):
    """run.json was written through ``run.json.tmp``: a FIFO planted there blocked the job
    at start, and a symbolic link there redirected the write to a file elsewhere."""
    os.mkfifo(tmp_path / "run.json.tmp")
    os.mkfifo(tmp_path / schema.RUN_FILENAME)
    target = tmp_path.parent / f"{tmp_path.name}-victim.txt"
    target.write_text("keep me")
    os.symlink(target, tmp_path / ".run.json.tmp")
    model, mon, step = within(20, tiny_job, tmp_path)
    for _ in range(3):
        within(20, step)
    within(20, mon.close)
    assert json.loads((tmp_path / schema.RUN_FILENAME).read_text())["status"] == "finished"
    assert target.read_text() == "keep me"
    assert oct((tmp_path / schema.RUN_FILENAME).stat().st_mode & 0o777) == oct(0o644)
