"""The spike testbed's labelling rule and mechanisms (benchmarks/spike_testbed.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.spike_testbed import (MECHANISMS, RunSpec, batch_at, label_events, lr_at,
                                      make_spec)


def curve(n=300, seed=0):
    """A training-loss curve: fast fall, then a plateau with per-batch noise (std 0.05)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return 2.0 + 2.5 * np.exp(-t / 15) + 0.05 * rng.standard_normal(n)


def test_noise_and_a_slow_drift_are_no_events():
    assert label_events(curve()) == []
    drift = curve() + np.linspace(0, 1.5, 300)  # +1.5 nat over 300 steps: no jump
    assert label_events(drift) == []


def test_a_recovering_jump_is_a_spike_with_its_onset_and_end():
    loss = curve()
    loss[150:156] += np.array([2.0, 1.5, 1.0, 0.6, 0.3, 0.1])
    [event] = label_events(loss)
    assert (event.kind, event.onset) == ("spike", 150)
    assert 152 <= event.end <= 155 and event.peak == pytest.approx(2.0, abs=0.2)


def test_a_jump_that_stays_is_a_collapse_and_so_is_a_non_finite_loss():
    loss = curve()
    loss[150:] += 1.0  # to a new, higher level (the pilot's collapse to the unigram loss)
    [event] = label_events(loss)
    assert (event.kind, event.onset) == ("collapse", 150)
    loss = curve()
    loss[100] = math.nan
    assert [(e.kind, e.onset) for e in label_events(loss[:101])] == [("collapse", 100)]


def test_two_spikes_are_two_events_and_the_early_fall_is_none():
    loss = curve()
    loss[5] += 3.0  # before step 20: the loss is still falling fast, not labelled
    loss[100] += 1.0
    loss[200] += 1.0
    assert [(e.onset, e.kind) for e in label_events(loss)] == [(100, "spike"), (200, "spike")]


def test_mechanisms_act_at_their_injection_steps():
    jump = make_spec("lr_jump", seed=0)
    s = jump.inject_at[0]
    assert [lr_at(jump, t) / jump.lr for t in (s - 1, s, s + 4, s + 5)] == [1.0, 16.0, 16.0, 1.0]
    bad = make_spec("bad_batch", seed=0)
    data = torch.arange(1000) % 128
    gen = torch.Generator().manual_seed(0)
    x, _ = batch_at(bad, bad.inject_at[0], data, gen, 16)
    assert x.unique().numel() == 1
    assert set(MECHANISMS) <= {"high_lr", "lr_jump", "weight_scale", "bit_flip", "bad_batch",
                               "adam_eps"}
    with pytest.raises(ValueError, match="unknown mechanism"):
        make_spec("nope", 0)
    assert RunSpec("x", 0).name == "x-s0"
