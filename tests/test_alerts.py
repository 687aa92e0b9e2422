"""Alert rules (monitor.alerts), alerts in the job and the flight recorder (monitor.flight)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

import monitor
from monitor import schema
from monitor.alerts import AlertEngine, AlertRule, replay
from monitor.flight import AlertConfig
from monitor.pss.detect import replay as pss_replay
from tests.helpers import read_scalars, read_texts

EVENTS = schema.TAG_ALERT_EVENTS + schema.TEXT_SUFFIX


# ------------------------------------------------------------------------ the rules alone
def noisy(n: int, seed: int = 0, level: float = 1.0) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    return (level * (1 + 0.1 * torch.randn(n, generator=gen))).tolist()


def test_ratio_rule_is_the_pss_detector_on_any_signal():
    series = noisy(200)
    series[120] *= 6  # a planted spike
    series[150] = math.nan
    rule = AlertRule("g", "train/grad_norm", "ratio", threshold=2.5, alpha=0.1, warmup_steps=20)
    fired = [a.step for a in replay(((t, {"train/grad_norm": v}) for t, v in enumerate(series)),
                                    [rule], cooldown=1)]
    assert fired == pss_replay(series, tau=2.5, alpha=0.1, warmup_steps=20) == [120, 150]


def test_rule_fires_on_a_planted_spike_and_not_on_a_control():
    rule = AlertRule("g", "train/grad_norm", threshold=2.5)
    control = noisy(500, seed=1)
    spiked = list(control)
    spiked[300] *= 5
    steps = lambda s: ((t, {"train/grad_norm": v}) for t, v in enumerate(s))  # noqa: E731
    assert replay(steps(control), [rule]) == []
    assert [a.step for a in replay(steps(spiked), [rule])] == [300]


def test_drop_and_level_rules_and_warmup():
    sr = [10.0] * 60 + [3.0] + [10.0] * 10
    drop = AlertRule("sr", "train/sr", "drop", threshold=2.0, warmup_steps=10)
    level = AlertRule("big", "train/sr", "level", threshold=9.5, warmup_steps=65)
    alerts = replay(((t, {"train/sr": v}) for t, v in enumerate(sr)), [drop, level], cooldown=100)
    assert [(a.rule, a.step) for a in alerts] == [("sr", 60), ("big", 65)]
    assert alerts[0].value == pytest.approx(10 / 3)


def test_per_layer_rule_names_the_worst_layer_and_respects_the_layer_pattern():
    rule = AlertRule("layer", "grad_norm", threshold=2.0, warmup_steps=5, layers=r"^fc\.")
    steps = []
    for t in range(30):
        values = {"grad_norm/fc.a": 1.0, "grad_norm/fc.b": 1.0, "grad_norm/emb": 1.0}
        if t == 20:
            values.update({"grad_norm/fc.a": 3.0, "grad_norm/fc.b": 9.0, "grad_norm/emb": 50.0})
        steps.append((t, values))
    [alert] = replay(steps, [rule])
    assert (alert.step, alert.layer, alert.layers_over) == (20, "fc.b", 2)
    assert "fc.b" in alert.describe() and "1 other" in alert.describe()


def test_storm_is_rate_limited_and_counted():
    engine = AlertEngine((AlertRule("always", "x", "level", threshold=1e-9, warmup_steps=0),),
                         cooldown=10)
    fired = [t for t in range(35) if engine.update(t, {"x": 1.0})]
    assert fired == [0, 10, 20, 30]
    assert engine.suppressed == {"always": 31} and engine.fired == {"always": 4}


@pytest.mark.parametrize("kwargs, words", [
    ({"name": "a b", "signal": "x"}, "name"),
    ({"name": "events", "signal": "x"}, "reserved"),
    ({"name": "a", "signal": "x", "kind": "up"}, "kind"),
    ({"name": "a", "signal": "x", "threshold": 0.5}, "> 1"),
    ({"name": "a", "signal": "x", "alpha": 0}, "alpha"),
    ({"name": "a", "signal": "grad_norm", "layers": "("}, "regular expression"),
])
def test_bad_rules_are_rejected_with_the_field_named(kwargs, words):
    with pytest.raises(ValueError, match=words):
        AlertRule(**kwargs)


def test_bad_watch_arguments(tmp_path):
    model = nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="needs alerts"):
        monitor.watch(model, opt, tmp_path, on_alert=print)
    with pytest.raises(TypeError, match="alerts"):
        monitor.watch(model, opt, tmp_path, alerts="yes")
    with pytest.raises(ValueError, match="distinct"):
        AlertConfig(rules=(AlertRule("a", "x"), AlertRule("a", "y")))


# ------------------------------------------------------------------------ in the job
def train(tmp_path, steps=80, spike_at=None, every=50, alerts=True, on_alert=None, name="run",
          preset="cheap"):
    """A small MLP regression; the batch of step ``spike_at`` has its targets scaled by 30."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 4, generator=gen)
    logdir = tmp_path / name
    mon = monitor.watch(model, opt, logdir, every=every, preset=preset, alerts=alerts,
                        on_alert=on_alert)
    done = 0
    for t in range(steps):
        x = torch.randn(32, 8, generator=gen)
        y = x @ w * (30.0 if t == spike_at else 1.0)  # one bad batch: a planted spike
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.log(loss=loss)
        done += 1
    mon.close()
    return str(logdir), done, mon


def test_job_alert_on_a_planted_spike_not_on_the_control(tmp_path):
    seen = []
    logdir, _, mon = train(tmp_path, spike_at=60, on_alert=seen.append, name="spike")
    scalars, texts = read_scalars(logdir), read_texts(logdir)
    assert scalars["alert/grad_norm_spike"] == {60: 1.0}
    assert [a.step for a in seen] == [60] and seen[0].rule == "grad_norm_spike"
    assert "step 60: rule `grad_norm_spike`" in texts[EVENTS][60]
    control, _, _ = train(tmp_path, name="control")
    assert not [t for t in read_scalars(control) if t.startswith("alert/")]


def test_flight_recorder_writes_the_steps_before_and_logs_the_steps_after(tmp_path):
    k = 8
    cfg = AlertConfig(record_steps=k, record_updates=True)
    logdir, _, mon = train(tmp_path, steps=80, spike_at=60, alerts=cfg)
    scalars = read_scalars(logdir)
    grad = scalars["grad_norm/0.weight"]
    # every=50 logs step 0 and 50; the ring adds 52..59, the trigger 60, the dense 61..68
    assert sorted(grad) == [0, 50, *range(60 - k, 60), 60, *range(61, 61 + k)]
    ratio = scalars["update_ratio/0.weight"]
    assert set(range(60 - k, 61 + k)) <= set(ratio)
    # the K steps after the trigger have the preset's metrics (sigma_max); the ring and the
    # trigger (not a logged step) only the cheap values
    assert set(scalars["sigma_max/0.weight"]) == {0, 50, *range(61, 61 + k)}
    assert set(range(60 - k, 61 + k)) <= set(scalars[schema.TAG_LOSS])
    # and the ring values are the true ones: the gradient norm jumps at the trigger only
    assert max(grad[s] for s in range(52, 60)) * 3 < grad[60]
    assert [s for s, _ in mon._alerting.ring][-1] == 79
    # by default (record_updates=False) the ring has update ratios of logged steps only
    logdir, _, _ = train(tmp_path, steps=62, spike_at=60, alerts=AlertConfig(record_steps=k),
                         name="no-updates")
    assert set(read_scalars(logdir)["update_ratio/0.weight"]) == {0, 50, 61}  # 61: after the alert


def test_ring_buffer_holds_the_steps_before_the_trigger(tmp_path):
    """The ring at the firing: the K steps before the trigger and the trigger, with gradient
    norms and update ratios equal to plain autograd's and the weights' own."""
    captured = {}
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    mon = monitor.watch(model, opt, tmp_path, every=100,
                        alerts=AlertConfig(record_steps=5, record_updates=True),
                        on_alert=lambda a: captured.update(ring=list(mon._alerting.ring)))
    grads, ratios = {}, {}
    for t in range(40):
        x = torch.randn(16, 4) * (100 if t == 30 else 1)
        model(x).pow(2).mean().backward()
        grads[t] = model.weight.grad.double().norm().item()
        before = model.weight.detach().double().clone()
        opt.step()
        ratios[t] = ((model.weight.detach().double() - before).norm() / before.norm()).item()
        opt.zero_grad()
    mon.close()
    ring = captured["ring"]
    assert [s for s, _ in ring] == [25, 26, 27, 28, 29, 30]
    for s, values in ring:
        assert values["grad_norm/weight"] == pytest.approx(grads[s], rel=1e-5)
        assert values["update_ratio/weight"] == pytest.approx(ratios[s], rel=1e-4)


def test_raising_callback_does_not_stop_training(tmp_path, caplog):
    def boom(alert):
        raise RuntimeError("checkpoint disk full")

    with caplog.at_level(logging.WARNING, logger="monitor"):
        logdir, done, mon = train(tmp_path, spike_at=60, on_alert=boom)
    assert done == 80 and mon.step == 80
    assert "checkpoint disk full" in caplog.text and "training goes on" in caplog.text
    scalars = read_scalars(logdir)
    assert scalars[schema.TAG_ALERT_CALLBACK_ERRORS][60] == 1.0
    assert "on_alert" in read_texts(logdir)[schema.TAG_FAILURE_TEXT + schema.TEXT_SUFFIX][60]


def test_rule_naming_a_missing_layer_metric_or_tag_is_said_and_the_job_goes_on(tmp_path, caplog):
    rules = [AlertRule("nolayer", "grad_norm", layers="^decoder"),
             AlertRule("nosje", "sje"),
             AlertRule("notag", "train/lossy"),
             AlertRule("ok", "train/grad_norm")]
    with caplog.at_level(logging.WARNING, logger="monitor"):
        logdir, done, _ = train(tmp_path, steps=160, spike_at=130, alerts=rules)
    assert done == 160
    for words in ("matches no monitored layer", "'sje' is not computed", "'train/lossy' has not"):
        assert words in caplog.text
    failures = "\n".join(read_texts(logdir)[schema.TAG_FAILURE_TEXT + schema.TEXT_SUFFIX].values())
    assert "nolayer" in failures and "nosje" in failures and "notag" in failures
    assert read_scalars(logdir)["alert/ok"] == {130: 1.0}


def test_alert_storm_in_the_job(tmp_path, caplog):
    storm = AlertConfig(rules=(AlertRule("always", "train/grad_norm", "level", threshold=1e-9,
                                         warmup_steps=0),), cooldown=20, record_steps=0)
    with caplog.at_level(logging.WARNING, logger="monitor"):
        logdir, done, mon = train(tmp_path, steps=60, alerts=storm)
    assert done == 60
    scalars = read_scalars(logdir)
    assert sorted(scalars["alert/always"]) == [0, 20, 40]
    assert mon._alerting.engine.suppressed == {"always": 57}
    assert scalars[schema.TAG_ALERT_SUPPRESSED][50] == 48.0  # steps 0-50 fired, 0, 20, 40 reported
    assert caplog.text.count("alert storm") == 1


def test_dashboard_shows_the_jobs_alerts_and_replays_the_same_rules(tmp_path):
    """The dashboard's alerts come from monitor.alerts: what the job wrote, else a replay."""
    from dashboard import alerts as dash_alerts
    from dashboard import data

    with_alerts, _, _ = train(tmp_path, spike_at=60, name="job")
    without, _, _ = train(tmp_path, spike_at=60, every=5, alerts=None, name="off")
    readers = [data.RunReader(with_alerts, "job"), data.RunReader(without, "off")]
    for reader in readers:
        reader.refresh()
    table = data.combine([reader.table() for reader in readers])
    found = dash_alerts.find_alerts(table)
    rules = found[found["kind"] == "rule grad_norm_spike"]
    assert list(zip(rules["run"], rules["step"])) == [("job", 60), ("off", 60)]
    assert "fired in the job" in rules.iloc[0]["detail"]
    assert "replayed" in rules.iloc[1]["detail"]


def test_demo_spike_option_spikes_with_alerts_on(tmp_path, monkeypatch):
    """``train_chargpt.py --spike-at N`` (what ``make demo DEMO_ARGS="--spike-at N"`` runs):
    an LR jump at N that spikes the loss, with alerts on. (At the demo's own size the
    default rule fires, ratio 11.8 > 7; this model is too small for a ratio of 7.)"""
    from demos import train_chargpt

    kwargs = {}
    real_watch = monitor.watch
    monkeypatch.setattr(train_chargpt.monitor, "watch",
                        lambda *a, **k: kwargs.update(k) or real_watch(*a, **k))
    cfg = train_chargpt.parse_args([
        "--spike-at", "40", "--steps", "50", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
        "--block-size", "32", "--batch-size", "8", "--warmup", "0", "--lr", "1e-2", "--every", "1",
        "--preset", "cheap", "--logdir", str(tmp_path), "--run-name", "spike"])
    assert [train_chargpt.lr_factor(cfg, t) for t in (39, 40, 44, 45)] == [1.0, 100.0, 100.0, 1.0]
    loss = read_scalars(train_chargpt.main(cfg))[schema.TAG_LOSS]
    assert kwargs["alerts"] is True and callable(kwargs["on_alert"])
    assert max(loss[t] for t in range(41, 47)) > loss[39] + 0.5


def test_flight_recorder_over_logged_steps_survives_tensorboards_purge(tmp_path):
    """The ring's steps before a logged step are written after it: TensorBoard's reader
    purges that tag's later values then, so the ring writes the logged steps again, with the
    same values; the logged steps' other metrics are not touched."""
    logdir, _, _ = train(tmp_path, steps=75, spike_at=62, every=5, alerts=AlertConfig(record_steps=8))
    scalars = read_scalars(logdir)  # EventAccumulator, purge_orphaned_data on (its default)
    grad = scalars["grad_norm/0.weight"]
    assert set(range(54, 62)) <= set(grad) and {50, 55, 60, 65, 70} <= set(grad)
    assert {55, 60} <= set(scalars["sigma_max/0.weight"]) and 70 in scalars["sigma_max/0.weight"]
    assert set(scalars[schema.TAG_LOSS]) >= {0, 5, *range(54, 71)}
