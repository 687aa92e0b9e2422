"""run.json tells how a run ended: finished, interrupted (Ctrl-C), crashed (an exception)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import monitor
from monitor import runstate, schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def state(logdir) -> str:
    with open(os.path.join(str(logdir), schema.RUN_FILENAME)) as fh:
        return json.load(fh)["status"]


@pytest.mark.parametrize("error, expected", [(None, "finished"), (KeyboardInterrupt, "interrupted"),
                                             (RuntimeError, "crashed")])
def test_the_context_manager_writes_how_the_job_ended(tmp_path, error, expected):
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        with monitor.watch(model, opt, str(tmp_path), every=1):
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
            assert state(tmp_path) == "running"
            if error:
                raise error()
    except (KeyboardInterrupt, RuntimeError):
        pass
    assert state(tmp_path) == expected


SCRIPT = """
import sys, torch, monitor
model = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
mon = monitor.watch(model, opt, sys.argv[1], every=1)  # never closed by the script
model(torch.randn(3, 4)).sum().backward()
opt.step()
if sys.argv[2] == "crash":
    raise ValueError("boom")
if sys.argv[2] == "ctrl-c":
    raise KeyboardInterrupt
"""


@pytest.mark.parametrize("how, expected", [("crash", "crashed"), ("ctrl-c", "interrupted")])
def test_a_monitor_never_closed_is_closed_at_exit_with_the_state(tmp_path, how, expected):
    env = {**os.environ, "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), how], env=env,
                   capture_output=True, timeout=120)
    assert state(tmp_path) == expected


def test_ending_state():
    assert runstate.ending_state(SystemExit, SystemExit(143)) == "interrupted"
    assert runstate.ending_state(SystemExit, SystemExit(0)) == "finished"
    assert runstate.ending_state(MemoryError) == "crashed"
