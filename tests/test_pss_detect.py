"""The detection rule: a table of gradient-norm sequences and the steps that must trigger."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from monitor.pss.detect import Detector, replay, trace

NAN, INF = math.nan, math.inf
FLAT = [1.0] * 20

CASES = [
    # (name, sequence, tau, alpha, warmup, expected trigger steps)
    ("flat", FLAT, 2.5, 0.1, 5, []),
    ("spike after warm-up", FLAT[:10] + [3.0] + FLAT[:5], 2.5, 0.1, 5, [10]),
    ("spike below tau", FLAT[:10] + [2.4] + FLAT[:5], 2.5, 0.1, 5, []),
    ("spike inside warm-up", [1.0, 1.0, 5.0, 1.0, 1.0, 1.0], 2.5, 0.1, 5, []),
    ("slow drift x1.05 per step", [1.05 ** i for i in range(40)], 2.5, 0.1, 5, []),
    ("NaN always triggers, even in warm-up", [1.0, NAN, 1.0, 1.0], 2.5, 0.1, 5, [1]),
    ("Inf triggers", FLAT[:8] + [INF] + FLAT[:3], 2.5, 0.1, 5, [8]),
    ("two spikes: the first raises the bar by 1.15 only", FLAT[:10] + [3.0, 3.0] + FLAT[:3], 2.5, 0.1, 5, [10, 11]),
    ("a huge spike: one trigger, the bar barely moves", FLAT[:10] + [100.0] + FLAT[:5] + [3.0], 2.5, 0.1, 5, [10, 16]),
    ("alpha=1: ratio to the previous (capped) value", [1, 2, 4, 8, 30], 3.0, 1.0, 0, [4]),
    ("sustained rise below tau enters the average", [1.0] * 10 + [2.0] * 30 + [6.0], 2.5, 0.2, 5, [40]),
    ("level shift x10: absorbed after 10 steps", FLAT + [10.0] * 40, 2.5, 0.1, 5, list(range(20, 30))),
    ("level shift x3: absorbed after 2 steps", FLAT + [3.0] * 40, 2.5, 0.1, 5, [20, 21]),
    ("level shift inside warm-up enters freely", [1.0] * 3 + [10.0] * 20, 2.5, 0.1, 5, [5, 6, 7]),
    ("slow drift x1.05 per step, long", [1.05 ** i for i in range(200)], 2.5, 0.1, 5, []),
    ("NaN never enters the average", FLAT[:10] + [NAN] * 3 + [3.0], 2.5, 0.1, 5, [10, 11, 12, 13]),
    ("zero start: the first positive value initialises", [0.0, 0.0, 1.0, 1.0, 3.0], 2.5, 0.1, 0, [4]),
]


@pytest.mark.parametrize("name,seq,tau,alpha,warmup,expected", CASES, ids=[c[0] for c in CASES])
def test_trigger_table(name, seq, tau, alpha, warmup, expected):
    assert replay(seq, tau, alpha, warmup) == expected


def test_ratio_is_against_the_previous_average():
    det = Detector(tau=2.5, alpha=0.5, warmup_steps=0)
    assert det.update(2.0) == (False, 1.0)  # initialises the average
    assert det.update(4.0) == (False, 2.0)  # m = 2 -> r = 2, then m = 3
    assert det.update(9.0) == (True, 3.0)  # m = 3 -> r = 3 > 2.5; enters capped at 2.5 m
    assert det.average == pytest.approx(0.5 * 3.0 + 0.5 * 7.5)


@pytest.mark.parametrize("tau,alpha", [(2.5, 0.1), (2.0, 0.05), (3.0, 0.3), (1.5, 1.0)])
@pytest.mark.parametrize("level", [4.0, 10.0, 1e3, 1e6])
def test_a_level_shift_stops_triggering_within_the_bound(tau, alpha, level):
    seq = [1.0] * 20 + [level] * 400
    hits = replay(seq, tau, alpha, warmup_steps=5)
    # while triggering, m grows by (1 - alpha + alpha tau) per step, from 1 to level / tau
    bound = math.ceil(math.log(level / tau) / math.log(1 - alpha + alpha * tau)) + 1
    assert hits == list(range(20, 20 + len(hits)))  # one run of triggers, right at the shift
    assert 1 <= len(hits) <= bound


def test_one_spike_raises_the_bar_by_at_most_the_cap_factor():
    for spike in (2.6, 10.0, 1e9):
        det = Detector(tau=2.5, alpha=0.1)
        det.update(1.0)
        assert det.update(spike)[0]
        assert det.average <= (1 - 0.1 + 0.1 * 2.5) + 1e-12


def test_trace_gives_ratios_and_triggers_per_step():
    rows = trace([(0, 1.0), (10, 1.0), (20, 5.0), (30, math.inf)], 2.5, 0.5, warmup_steps=5)
    assert [r[0] for r in rows] == [0, 10, 20, 30]
    assert [r[2] for r in rows] == [False, False, True, True]
    assert rows[0][1] == 1.0 and rows[2][1] == pytest.approx(5.0) and rows[3][1] == math.inf


def test_replay_with_logged_steps_uses_step_numbers_for_warm_up():
    logged = [(0, 1.0), (50, 1.0), (100, 5.0), (150, 1.0), (200, 5.0)]
    assert replay(logged, 2.5, 0.1, warmup_steps=120) == [200]
    assert replay(logged, 2.5, 0.1, warmup_steps=0) == [100, 200]


def test_detect_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, monitor.pss.detect, monitor.schema; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_spec_states_the_capped_average_the_detector_uses():
    """Issue 11: SPEC 3 said the average was plain while the code caps a spike at tau * m."""
    spec = (Path(__file__).resolve().parents[1] / "docs" / "SPEC.md").read_text(encoding="utf-8")
    section = spec[spec.index("## 3. Parametric"):spec.index("## 4.")]
    assert "m_t = (1 - α) m_{t-1} + α · min(g_t, τ · m_{t-1})" in section
    assert "before any clipping" in section  # and which norm it reads
    det = Detector(tau=2.5, alpha=0.1, warmup_steps=0)
    det.update(1.0)
    assert det.update(100.0) == (True, 100.0)
    assert det.average == pytest.approx(0.9 * 1.0 + 0.1 * 2.5)  # capped, as SPEC says
    det.update(2.0)  # below the bar: the plain average
    assert det.average == pytest.approx(0.9 * 1.15 + 0.1 * 2.0)
