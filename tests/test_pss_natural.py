"""The natural-spike stage of the PSS trial (benchmarks/pss_natural.py): spike counting,
the largest excursion, the trigger lead and the paired tests, on synthetic curves."""

from __future__ import annotations

import math

import pytest

from benchmarks.pss_natural import (LEAD_AFTER, LEAD_BEFORE, events, max_excursion, paired,
                                    trigger_leads)


def curve(n=300, base=2.0, bumps=(), nan_at=None):
    """A flat loss with rectangular bumps ``(onset, length, height)``."""
    loss = [base] * n
    for onset, length, height in bumps:
        for t in range(onset, onset + length):
            loss[t] = base + height
    if nan_at is not None:
        loss[nan_at:] = [math.nan] * (n - nan_at)
    return loss


def test_events_count_spikes_and_collapses_the_way_label_events_does():
    # two short spikes (recover within 100 steps), a bump below the 0.5-nat jump, one collapse
    loss = curve(400, bumps=((60, 5, 2.0), (130, 30, 1.0), (180, 5, 0.3), (250, 150, 3.0)))
    n_spikes, n_collapses, onsets = events(loss)
    assert (n_spikes, n_collapses, onsets) == (2, 1, [60, 130])
    assert events(curve(100, nan_at=50))[:2] == (0, 1)  # non-finite: a collapse
    assert events(curve(100))[:2] == (0, 0)


def test_max_excursion_is_the_largest_rise_above_the_running_minimum():
    loss = [5.0, 4.0, 3.0] + [2.0] * 30 + [2.7] + [1.0] * 10 + [2.5] + [1.0] * 5
    assert max_excursion(loss) == pytest.approx(1.5)  # 2.5 over the minimum 1.0, not 0.7
    # before MIN_STEP (20) the early fall from the initial loss does not count
    assert max_excursion([1.0, 9.0] + [1.0] * 30) == 0.0
    assert max_excursion([2.0] * 30 + [math.inf]) == math.inf


def test_trigger_leads_take_the_first_trigger_in_the_window_around_each_onset():
    onsets = [100, 200, 300]
    fired = [50, 85, 95, 205, 300 + LEAD_AFTER + 1]
    # 100: triggers at 85 and 95 are in [80, 110]: the first, 85, leads by 15 steps;
    # 200: only 205, after the onset: -5; 300: 311 is outside the window: none
    assert trigger_leads(fired, onsets) == [15, -5, None]
    assert trigger_leads([100 - LEAD_BEFORE], [100]) == [LEAD_BEFORE]
    assert trigger_leads([100 - LEAD_BEFORE - 1], [100]) == [None]
    assert trigger_leads([], [10]) == [None]


def _run(spikes: int, val: float) -> dict:
    bumps = tuple((40 + 30 * i, 3, 2.0) for i in range(spikes))
    return {"losses": curve(300, bumps=bumps), "val": val, "fired": [], "dw": [],
            "explosion": None}


def test_paired_differences_and_p_values_follow_scipy():
    from scipy.stats import ttest_rel, wilcoxon
    a = {s: _run(1, 2.0 + 0.01 * s) for s in range(6)}
    b = {s: _run(3 + s % 2, 2.5 + 0.02 * s) for s in range(6)}
    d, p = paired(a, b, "spikes")
    assert d == [-2, -3, -2, -3, -2, -3]
    assert p == pytest.approx(wilcoxon(d, zero_method="zsplit").pvalue)
    b[0]["losses"][250:] = [9.0] * 50  # a collapse in b's seed 0: one more event there
    d_ev, p_ev = paired(a, b, "events")
    assert d_ev == [-3, -3, -2, -3, -2, -3]
    assert p_ev == pytest.approx(wilcoxon(d_ev, zero_method="zsplit").pvalue)
    d, p = paired(a, b, "val")
    assert d == pytest.approx([-0.5 - 0.01 * s for s in range(6)])
    assert p == pytest.approx(ttest_rel([2.0 + 0.01 * s for s in range(6)],
                                        [2.5 + 0.02 * s for s in range(6)]).pvalue)
    # identical arms: no test (every difference 0), and a single shared seed: none either
    assert math.isnan(paired(a, a, "spikes")[1])
    assert math.isnan(paired({0: a[0]}, {0: b[0]}, "val")[1])


def test_surges_divide_the_peak_near_the_onset_by_the_median_before():
    from benchmarks.pss_natural import surges
    g = [1.0] * 100 + [1.0, 2.0, 30.0, 1.0] + [1.0] * 50
    assert surges(g, [102]) == pytest.approx([30.0])
    assert surges(g, [140]) == pytest.approx([1.0])  # the surge is not within 5 steps
    g[50] = math.nan  # non-finite norms are left out of the median
    assert surges(g, [102]) == pytest.approx([30.0])


def test_late_explosion_ignores_the_initial_transient_but_sees_a_later_explosion():
    from benchmarks.pss_natural import late_explosion
    from benchmarks.pss_testbed import explosion_step
    start = [2.0] + [4.0] * 25 + [1.0] * 30  # no warm-up: the loss first rises for 25 steps
    assert explosion_step(start) == 1 and late_explosion(start) is None
    later = start + [3.0] * 25
    assert late_explosion(later) == len(start)
    assert late_explosion(start + [math.nan]) == len(start)
