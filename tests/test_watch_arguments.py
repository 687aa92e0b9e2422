"""watch() and the framework callbacks reject wrong arguments at once, naming them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import monitor
from monitor.config import MonitorConfig
from monitor.integrations.callbacks import WatchSettings


def model_and_opt():
    model = nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_watch_rejects_an_unknown_preset_even_with_a_config(tmp_path):
    model, opt = model_and_opt()
    with pytest.raises(ValueError, match="preset='bogus'.*cheap"):
        monitor.watch(model, opt, tmp_path, preset="bogus", config=MonitorConfig())
    with pytest.raises(ValueError, match="preset='bogus'"):
        monitor.watch(model, opt, tmp_path, preset="bogus")


def test_watch_rejects_a_config_of_the_wrong_type(tmp_path):
    model, opt = model_and_opt()
    with pytest.raises(TypeError, match="config=.*MonitorConfig"):
        monitor.watch(model, opt, tmp_path, config={"every": 5})


@pytest.mark.parametrize("kwargs,error,match", [
    ({"pss": "on"}, TypeError, "pss=.*'on'"),
    ({"every": 5, "config": MonitorConfig(every=10)}, ValueError, "every=5.*config.every=10"),
    ({"preset": "bogus"}, ValueError, "preset='bogus'"),
    ({"preset": "bogus", "config": MonitorConfig()}, ValueError, "preset='bogus'"),
    ({"config": "full"}, TypeError, "MonitorConfig"),
])
def test_watch_settings_validate_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        WatchSettings("runs/x", **kwargs)


def test_watch_settings_accept_what_watch_accepts():
    settings = WatchSettings("runs/x", every=10, config=MonitorConfig(every=10), pss=True)
    assert settings.config.every == 10 and settings.pss == monitor.PSSConfig()
    assert WatchSettings("runs/x", pss=False).pss is None
