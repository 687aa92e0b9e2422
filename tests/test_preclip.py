"""Gradient norms before the user's clipping: detection and train/grad_norm see the spike.

Reference: ``clip_grad_norm_`` returns the total norm it saw before clipping.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import monitor
from monitor import schema
from monitor.schema import PSSConfig
from tests.helpers import read_scalars

SPIKE = 40


def _train(logdir, clip: float | None, steps: int = 50, accumulate: int = 1, every: int = 1,
           pss: PSSConfig | None = None, alerts=None, on_alert=None):
    """A small MLP; at step SPIKE the loss is multiplied by 100 (a planted gradient spike).
    Returns the monitor and clip_grad_norm_'s pre-clip totals per step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 8), 20 * torch.randn(64, 1)  # gradient norms ~10: clip 1.0 always acts
    totals = []
    with monitor.watch(model, opt, logdir, every=every, preset="cheap", pss=pss, alerts=alerts,
                       on_alert=on_alert) as mon:
        for step in range(steps):
            for micro in range(accumulate):
                half = slice(micro * 32 // accumulate * accumulate, None) if accumulate > 1 else slice(None)
                loss = nn.functional.mse_loss(model(x[half]), y[half]) / accumulate
                (loss * (100.0 if step == SPIKE else 1.0)).backward()
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else float("inf"))
            totals.append(float(total))
            opt.step()
            opt.zero_grad()
    return mon, totals


@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_clipped_job_still_triggers_on_a_planted_spike(tmp_path, clip):
    """Before issue 11 the step pre-hook read the clipped gradient: with clip 1.0 acting on
    every step, it saw 1.0 at the spike as on every other step, and never triggered."""
    mon, totals = _train(tmp_path / str(clip), clip, every=1000,  # not logged: PSS's own path
                         pss=PSSConfig(warmup_steps=10))
    assert totals[SPIKE] > 50 * max(totals[SPIKE - 5: SPIKE])  # the spike is real
    assert mon.pss.interventions == [SPIKE]


@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_clipped_job_still_alerts_on_a_planted_spike(tmp_path, clip):
    """The alert rules read the same pre-clip norms as PSS, on steps that are not logged
    too: with clip 1.0 on every step, the applied norm is 1.0 at the spike as before it."""
    seen = []
    _, totals = _train(tmp_path / str(clip), clip, every=1000, alerts=True, on_alert=seen.append)
    assert totals[SPIKE] > 50 * max(totals[SPIKE - 5: SPIKE])
    assert [a.step for a in seen] == [SPIKE] and seen[0].rule == "grad_norm_spike"
    assert seen[0].value > 7.0


def test_grad_norm_is_before_clipping_and_the_applied_norm_has_its_tag(tmp_path):
    _, totals = _train(tmp_path, clip=1.0, steps=45)
    logged = read_scalars(str(tmp_path))
    pre, applied = logged[schema.TAG_GLOBAL_GRAD_NORM], logged[schema.TAG_GLOBAL_GRAD_NORM_APPLIED]
    for t, total in enumerate(totals):
        assert pre[t] == pytest.approx(total, rel=1e-4)
    clipped = [t for t, total in enumerate(totals) if total > 1.0]
    assert SPIKE in clipped and sorted(applied) == clipped  # written only when they differ
    for t in clipped:
        assert applied[t] == pytest.approx(1.0, rel=1e-4)
    # per-layer norms before clipping too: they add up to the global one
    layers = [tag for tag in logged if tag.startswith("grad_norm/")]
    spike_sq = sum(logged[tag][SPIKE] ** 2 for tag in layers)
    assert spike_sq ** 0.5 == pytest.approx(totals[SPIKE], rel=1e-4)


def test_gradient_accumulation_reads_the_final_accumulated_gradient(tmp_path):
    _, totals = _train(tmp_path, clip=1.0, steps=42, accumulate=2)
    pre = read_scalars(str(tmp_path))[schema.TAG_GLOBAL_GRAD_NORM]
    for t, total in enumerate(totals):
        assert pre[t] == pytest.approx(total, rel=1e-4)


def test_no_norm_is_computed_on_steps_that_neither_log_nor_run_pss(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with monitor.watch(model, opt, tmp_path, every=3, preset="cheap") as mon:
        for step in range(4):
            model(torch.randn(8, 4)).pow(2).mean().backward()
            assert bool(mon._preclip._norms) == (step % 3 == 0)  # stored only for logged steps
            opt.step()
            opt.zero_grad()
    assert mon._preclip._handles == []  # close() removed the hooks


def test_sparse_and_float64_gradients_are_tapped(tmp_path):
    """nn.Embedding(sparse=True) and a float64 layer: the tapped norms equal the dense ones."""
    torch.manual_seed(0)
    emb = nn.Embedding(20, 6, sparse=True)
    head = nn.Linear(6, 1).double()
    model = nn.ModuleDict({"emb": emb, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with monitor.watch(model, opt, tmp_path, every=1, preset="cheap") as mon:
        idx = torch.tensor([1, 3, 3, 7])  # a repeated index: duplicate COO entries
        (head(emb(idx).double()).pow(2).sum() * 50.0).backward()
        dense = {n: float(p.grad.to_dense().norm()) for n, p in model.named_parameters()}
        torch.nn.utils.clip_grad_norm_([head.weight, head.bias], 1e-3)
        opt.step()
    logged = read_scalars(str(tmp_path))
    for name, value in dense.items():
        assert logged[f"grad_norm/{name}"][0] == pytest.approx(value, rel=1e-5), name
    assert mon.step == 1
