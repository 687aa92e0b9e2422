"""User ``layers`` patterns (monitor/patterns.py): a hostile one never stalls the job or the
dashboard; it is refused with its name, and the settings in force stay.

Python's ``re`` holds the GIL for the whole of a catastrophic match, so neither a thread nor
pytest-timeout's alarm can stop it: the job runs in a forked child, which is killed and the
test failed when it has not finished in time."""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import pytest
import torch
from torch import nn

import monitor
from monitor import patterns, schema
from monitor.alerts import AlertRule
from monitor.schema import ControlError, PSSConfig, write_control
from tests.helpers import read_scalars, read_texts

HOSTILE_NAME = "a" * 40 + "!"  # (a+)+$ on it: 2^40 steps of backtracking in `re`
NESTED = "(a+)+$"  # the classic; `regex` matches it at once (it is optimised away there)
OVERLAPPING = "(a|aa)+$"  # catastrophic in `regex` too: only its timeout stops it


class Named(nn.Module):
    """A Linear and a matrix parameter with a long name of a's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(6, 6)
        self.register_parameter(HOSTILE_NAME, nn.Parameter(torch.randn(4, 4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).pow(2).mean() + getattr(self, HOSTILE_NAME).pow(2).mean()


def _job(logdir: str, hostile: str, out_path: str) -> None:
    """20 steps; the control file's ``layers`` becomes ``hostile`` before step 5."""
    torch.set_num_threads(1)
    model = Named()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = monitor.watch(model, opt, logdir, every=5, preset="cheap",
                        pss=PSSConfig(layers="net", warmup_steps=2))
    before = [name for name, *_ in mon.pss.selected]
    x = torch.randn(8, 6)
    for step in range(20):
        if step == 3:
            write_control(logdir, PSSConfig(layers=hostile, warmup_steps=2, tau=4.0))
        model(x).backward()
        opt.step()
        opt.zero_grad()
    after = [name for name, *_ in mon.pss.selected]
    mon.close()
    with open(out_path, "w") as fh:
        json.dump({"before": before, "after": after, "tau": mon.pss.config.tau}, fh)


def _run_within(seconds: float, tmp_path, hostile: str) -> dict:
    out = tmp_path / "out.json"
    child = multiprocessing.get_context("fork").Process(
        target=_job, args=(str(tmp_path), hostile, str(out)))
    start = time.monotonic()
    child.start()
    child.join(seconds)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"the job stalled on the layers pattern {hostile!r} (> {seconds} s)")
    assert child.exitcode == 0 and out.exists(), child.exitcode
    result = json.loads(out.read_text())
    result["seconds"] = time.monotonic() - start
    return result


@pytest.mark.timeout(60)
def test_an_overlapping_pattern_in_control_json_is_refused_and_the_selection_stays(tmp_path):
    got = _run_within(20, tmp_path, OVERLAPPING)
    assert got["before"] == got["after"] == ["net.weight"]  # the old selection stays
    assert got["tau"] == 2.5  # the whole change is refused, not half applied
    notes = "\n".join(read_texts(str(tmp_path))[schema.TAG_PSS_CONTROL_TEXT
                                                + schema.TEXT_SUFFIX].values())
    assert f"layers {OVERLAPPING!r}" in notes and "previous settings kept" in notes, notes
    assert "catastrophic backtracking" in notes
    scalars = read_scalars(str(tmp_path))
    assert set(scalars[schema.TAG_PSS_CONTROL_VERSION].values()) == {1.0}  # not acknowledged
    assert set(scalars[schema.TAG_PSS_TAU].values()) == {2.5}


@pytest.mark.timeout(60)
def test_a_nested_quantifier_pattern_does_not_stall_the_job(tmp_path):
    got = _run_within(20, tmp_path, NESTED)
    assert got["before"] == ["net.weight"]
    assert got["after"] == []  # no name ends in a run of a's: the pattern selects nothing
    assert got["tau"] == 4.0
    scalars = read_scalars(str(tmp_path))
    assert scalars[schema.TAG_PSS_CONTROL_VERSION][15] == 2.0  # applied and acknowledged


def test_the_selection_is_matched_once_per_change_not_per_step(tmp_path, monkeypatch):
    calls = []
    real = patterns.select
    monkeypatch.setattr(patterns, "select", lambda text, names, *a: calls.append(text)
                        or real(text, names, *a))
    model = Named()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 6)
    with monitor.watch(model, opt, tmp_path, every=50, preset="cheap",
                       pss=PSSConfig(layers="net", warmup_steps=2)) as mon:
        for step in range(30):
            if step == 12:
                write_control(tmp_path, PSSConfig(layers="a+!", warmup_steps=2))
            model(x).backward()
            opt.step()
            opt.zero_grad()
    assert calls == [".*", "net", "a+!"]  # the monitor's own layers, PSS at start, the change
    assert [name for name, *_ in mon.pss.selected] == [HOSTILE_NAME]


@pytest.mark.timeout(30)
def test_patterns_that_would_stall_or_blow_up_are_refused_fast():
    start = time.monotonic()
    with pytest.raises(patterns.PatternError, match="took more than 0.2 s"):
        patterns.select(OVERLAPPING, [HOSTILE_NAME] * 3, timeout_s=0.2)
    # `regex` unrolls bounded repeats when compiling: one more level takes minutes
    with pytest.raises(patterns.PatternError, match="unroll to more than"):
        patterns.compile_pattern("((a{1000}){1000}){1000}")
    with pytest.raises(ControlError, match="layers: .* unroll to more than"):
        PSSConfig(layers="(?:a{1000}){1000}")
    assert time.monotonic() - start < 5
    assert patterns.select(r"^(?!.*bias)\w+\.\d+", ["h.0.weight", "h.0.bias", "x"]) == ["h.0.weight"]
    assert patterns.select(NESTED, ["aaa", HOSTILE_NAME]) == ["aaa"]


@pytest.mark.timeout(30)
def test_watch_refuses_a_stalling_monitor_or_alert_pattern_with_its_name(tmp_path):
    model = Named()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    config = monitor.MonitorConfig.preset("cheap", layers=OVERLAPPING)
    with pytest.raises(ValueError, match=r"layers=.*\(a\|aa\)\+\$.*catastrophic"):
        monitor.watch(model, opt, tmp_path / "m", config=config)
    rule = AlertRule("r", "grad_norm", layers=OVERLAPPING)
    with pytest.raises(ValueError, match=r"AlertRule\('r'\)\.layers.*catastrophic"):
        monitor.watch(model, opt, tmp_path / "a", alerts=[rule])


@pytest.mark.timeout(30)
def test_dashboard_layer_filter_refuses_a_stalling_pattern():
    from dashboard import charts

    with pytest.raises(patterns.PatternError, match="catastrophic"):
        charts.filter_layers([HOSTILE_NAME], OVERLAPPING)
    assert charts.filter_layers([HOSTILE_NAME, "net.weight"], NESTED) == []


@pytest.mark.timeout(120)
def test_dashboard_views_show_a_stalling_pattern_as_a_message(tmp_path, monkeypatch):
    """Typed into the Layers and Learning-rates views' filters, a pattern that only the
    time budget stops gives an error message on the page, not an exception."""
    from tests.test_dashboard_app import open_app, show, texts

    model = Named()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with monitor.watch(model, opt, str(tmp_path / "run"), every=1, preset="cheap"):
        x = torch.randn(8, 6)
        for _ in range(3):
            model(x).backward()
            opt.step()
            opt.zero_grad()
    at = show(open_app(tmp_path, monkeypatch), "Layers")
    at.text_input(key="layers_filter").set_value(OVERLAPPING).run()
    assert not at.exception, [e.value for e in at.exception]
    assert "catastrophic" in texts(at.error)
    show(at, "Learning rates").text_input(key="lr_filter").set_value(OVERLAPPING).run()
    assert not at.exception, [e.value for e in at.exception]
    assert "catastrophic" in texts(at.error)
