"""PSS inside a monitored job: triggers, smoothing, live control, never killing the job."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import monitor
from monitor import schema
from monitor.schema import PSSConfig, write_control
from tests.helpers import read_scalars, read_texts


def run(tmp_path, steps, pss, events=None, every=5, seed=0):
    """Train a small MLP; ``events[step](model, tmp_path)`` runs after backward at that step.
    An event's ``grad_factors(model)`` (``[(param, factor)]``) scales gradients *during* the
    backward (tensor hooks), as a real spike does: PSS reads the norm autograd accumulated,
    before any change user code makes afterwards (clipping)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    weights = []
    with monitor.watch(model, opt, tmp_path, every=every, preset="cheap", pss=pss) as mon:
        for step in range(steps):
            loss = nn.functional.mse_loss(model(x), y)
            event = (events or {}).get(step)
            handles = [p.register_hook(lambda g, f=f: f * g)
                       for p, f in getattr(event, "grad_factors", lambda m: [])(model)]
            loss.backward()
            for handle in handles:
                handle.remove()
            if events and step in events:
                events[step](model, tmp_path)
            opt.step()
            opt.zero_grad()
            mon.log(loss=loss)
            weights.append(model[2].weight.detach().clone())
    assert mon.step == steps
    texts = read_texts(str(tmp_path))
    return read_scalars(str(tmp_path)), texts, weights


def spike(factor, only=None):
    """Every gradient (or ``only(model)``'s) times ``factor`` in the backward pass."""
    def event(model, _):
        pass
    event.grad_factors = lambda m: [(p, factor) for p in ([only(m)] if only else m.parameters())]
    return event


def text(texts, tag):
    return "\n".join(texts.get(tag + schema.TEXT_SUFFIX, {}).values())


def test_a_gradient_spike_triggers_one_intervention_that_flattens_the_top(tmp_path):
    logged, texts, _ = run(tmp_path, 30, PSSConfig(warmup_steps=5, method="clip"), {17: spike(20.0)})
    interventions = {s for s, v in logged[schema.TAG_PSS_INTERVENTION].items() if v == 1}
    assert interventions == {17}
    assert logged[schema.TAG_PSS_TRIGGER_RATIO][17] > 10  # logged although 17 is no logged step
    for name in ("0.weight", "2.weight", "4.weight"):
        if name != "4.weight":  # 4.weight is (1, 32): one value, k = 1, nothing to flatten
            assert logged[f"pss_sigma_after/{name}"][17] < logged[f"pss_sigma_before/{name}"][17]
        assert logged[f"pss_sr_after/{name}"][17] >= logged[f"pss_sr_before/{name}"][17] * (1 - 1e-6)
        assert logged[f"pss_k/{name}"][17] >= 1
    assert logged["pss_sigma_after/4.weight"][17] == pytest.approx(
        logged["pss_sigma_before/4.weight"][17], rel=1e-6)
    assert "0.bias" not in str(logged.keys() & {f"pss_k/{n}" for n in ("0.bias",)})
    events = text(texts, schema.TAG_PSS_EVENTS)
    assert "step 17: intervention (trigger ratio" in events and "2.weight: k=" in events
    assert logged[schema.TAG_PSS_TAU][0] == 2.5 and logged[schema.TAG_PSS_ENABLED][0] == 1


def test_no_pss_argument_means_monitoring_only(tmp_path):
    logged, _, _ = run(tmp_path, 20, None, {12: spike(20.0)})
    assert not any(tag.startswith("pss") for tag in logged)
    assert not (tmp_path / schema.CONTROL_FILENAME).exists()


def test_live_control_changes_tau_and_is_acknowledged(tmp_path):
    def raise_tau(model, logdir):
        write_control(logdir, PSSConfig(warmup_steps=5, tau=50.0))

    logged, texts, _ = run(tmp_path, 30, PSSConfig(warmup_steps=5), {8: raise_tau, 20: spike(20.0)})
    assert logged[schema.TAG_PSS_CONTROL_VERSION][0] == 1  # the job wrote version 1 at start
    acked = min(s for s, v in logged[schema.TAG_PSS_CONTROL_VERSION].items() if v == 2)
    assert 8 < acked <= 8 + 5  # read within check_every steps
    assert logged[schema.TAG_PSS_TAU][acked] == 50.0
    assert all(v == 0 for v in logged[schema.TAG_PSS_INTERVENTION].values())  # 20x < tau 50
    assert "applied control.json version 2: {'tau': 50.0}" in text(texts, schema.TAG_PSS_CONTROL_TEXT)


def test_malformed_control_file_mid_run_keeps_settings(tmp_path):
    def corrupt(model, logdir):
        (logdir / schema.CONTROL_FILENAME).write_text('{"version": 7, "settings": {"tau": -1}}')

    logged, texts, _ = run(tmp_path, 30, PSSConfig(warmup_steps=5, tau=3.0), {6: corrupt, 20: spike(20.0)})
    assert set(logged[schema.TAG_PSS_TAU].values()) == {3.0}
    assert set(logged[schema.TAG_PSS_CONTROL_VERSION].values()) == {1.0}
    control = text(texts, schema.TAG_PSS_CONTROL_TEXT)
    assert "rejected, previous settings kept: tau: -1" in control
    assert logged[schema.TAG_PSS_INTERVENTION][20] == 1  # the old settings still work


def test_smooth_now_request(tmp_path):
    def request(model, logdir):
        write_control(logdir, PSSConfig(warmup_steps=5), smooth_now=True)

    logged, texts, _ = run(tmp_path, 20, PSSConfig(warmup_steps=5), {7: request})
    interventions = [s for s, v in logged[schema.TAG_PSS_INTERVENTION].items() if v == 1]
    assert len(interventions) == 1 and 7 < interventions[0] <= 12
    assert "smooth-now request" in text(texts, schema.TAG_PSS_EVENTS)


def test_skip_update_drops_the_triggering_step(tmp_path):
    cfg = PSSConfig(warmup_steps=5, skip_update=True, layers="^$")  # detect, smooth nothing
    _, _, weights = run(tmp_path, 15, cfg, {10: spike(20.0)})
    assert torch.equal(weights[10], weights[9])  # step 10's update was dropped
    assert not torch.equal(weights[11], weights[10])


def test_non_finite_gradient_triggers_and_its_update_is_always_skipped(tmp_path):
    def poison(model, _):
        model[2].weight.grad[0, 0] = math.nan

    logged, _, weights = run(tmp_path, 15, PSSConfig(warmup_steps=5), {9: poison})
    assert logged[schema.TAG_PSS_INTERVENTION][9] == 1
    assert math.isinf(logged[schema.TAG_PSS_TRIGGER_RATIO][9])
    assert all(torch.isfinite(w).all() for w in weights)  # the job is not destroyed
    assert logged[schema.TAG_PSS_INTERVENTION].get(10, 0) == 0


def test_per_layer_detection_smooths_only_the_layer_that_spiked(tmp_path):
    cfg = PSSConfig(warmup_steps=5, per_layer=True)
    logged, _, _ = run(tmp_path, 20, cfg, {12: spike(30.0, only=lambda m: m[2].weight)})
    smoothed = {tag.split("/", 1)[1] for tag, series in logged.items()
                if tag.startswith("pss_k/") and 12 in series}
    assert smoothed == {"2.weight"}


def test_k_min_2_lets_pss_act_on_a_rank_one_layer(tmp_path):
    def collapse_and_spike(model, _):
        with torch.no_grad():  # layer 2 nearly rank one: stable rank ~1, SPEC's k = 1
            W = model[2].weight
            u, v = torch.randn(W.shape[0], 1), torch.randn(1, W.shape[1])
            W.copy_(0.01 * torch.randn_like(W) + 3.0 * u @ v / (u.norm() * v.norm()))

    collapse_and_spike.grad_factors = spike(20.0).grad_factors

    sigma = {}
    for k_min in (1, 2):
        logdir = tmp_path / f"k{k_min}"
        logdir.mkdir()
        cfg = PSSConfig(warmup_steps=5, k_min=k_min, layers=r"^2\.")
        logged, _, _ = run(logdir, 20, cfg, {12: collapse_and_spike})
        assert logged[schema.TAG_PSS_INTERVENTION][12] == 1
        assert logged["pss_k/2.weight"][12] == k_min
        sigma[k_min] = logged["pss_sigma_after/2.weight"][12] / logged["pss_sigma_before/2.weight"][12]
    assert sigma[1] == pytest.approx(1.0, abs=1e-3)  # k = 1: nothing changes
    assert sigma[2] < 0.7  # k = 2: sigma_1 pulled towards sigma_2 (conv: (2 s1 + s2) / 3)
