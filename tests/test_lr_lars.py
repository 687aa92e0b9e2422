"""LARS, LAMB, TVLARS against the formulas written out step by step (float64), and the
monitor's ``lr`` tag against the trust ratio the optimizer applied."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import monitor
from monitor.config import MonitorConfig
from monitor.lr import LAMB, LARS, TVLARS, tvlars_factor, warmup_cosine, warmup_cosine_factor
from tests.helpers import read_scalars

# the formula tests use short plateaus on purpose
pytestmark = pytest.mark.filterwarnings("ignore:TVLARS.*no high plateau:UserWarning")


def two_tensors():
    """A 2-D weight (adapted) and a 1-D bias (excluded by default), with gradients."""
    w = nn.Parameter(torch.randn(4, 3))
    b = nn.Parameter(torch.randn(4))
    return w, b


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def norm(t):
    return math.sqrt(float((t * t).sum()))


def lars_reference(w, grads, lr, mu, wd, eta, excluded, factors=None):
    """Explicit LARS (You et al. 2017, Alg. 1), float64: returns weights and ratios per step."""
    w = w.double().clone()
    v = torch.zeros_like(w)
    ratios = []
    for t, g in enumerate(grads):
        g = g.double()
        if excluded:
            d, r = g, 1.0
        else:
            d = g + wd * w
            r = eta * norm(w) / norm(d)
            if factors is not None:
                r *= factors[t]
        v = mu * v + lr * r * d
        w = w - v
        ratios.append(r)
    return w, ratios


@pytest.mark.parametrize("cls", ["LARS", "TVLARS"])
def test_lars_and_tvlars_steps_match_the_formula(cls):
    w, b = two_tensors()
    w0, b0 = w.detach().clone(), b.detach().clone()
    lr, mu, wd, eta = 0.5, 0.9, 0.01, 0.02
    tv = dict(alpha=0.5, lam=0.7, delay=1.0, gamma_min=0.05)
    if cls == "LARS":
        opt = LARS([w, b], lr=lr, momentum=mu, weight_decay=wd, eta=eta)
        factors = None
    else:
        opt = TVLARS([w, b], lr=lr, momentum=mu, weight_decay=wd, eta=eta, **tv)
        factors = [1 / (tv["alpha"] + math.exp(tv["lam"] * (t - tv["delay"]))) + tv["gamma_min"]
                   for t in (1, 2, 3)]  # t = 1 on the first step
    gw, gb = [], []
    for t in range(3):
        set_grads([w, b], seed=t)
        gw.append(w.grad.clone())
        gb.append(b.grad.clone())
        opt.step()
        ref_w, ratios = lars_reference(w0, gw, lr, mu, wd, eta, False, factors)
        ref_b, _ = lars_reference(b0, gb, lr, mu, wd, eta, True)
        torch.testing.assert_close(w.detach().double(), ref_w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.detach().double(), ref_b, rtol=1e-5, atol=1e-6)
        assert opt.state[w]["trust_ratio"] == pytest.approx(ratios[-1], rel=1e-5)
        assert opt.state[b]["trust_ratio"] == 1.0


def test_exclusion_follows_the_group_flag():
    w, b = two_tensors()
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = LARS([{"params": [w], "exclude": True}, {"params": [b], "exclude": False}],
               lr=0.3, momentum=0.0, weight_decay=0.1, eta=0.05)
    set_grads([w, b], seed=3)
    gw, gb = w.grad.clone(), b.grad.clone()
    opt.step()
    # excluded 2-D weight: plain step, no weight decay, ratio 1
    torch.testing.assert_close(w.detach(), w0 - 0.3 * gw)
    assert opt.state[w]["trust_ratio"] == 1.0
    # adapted 1-D bias: weight decay and trust ratio
    d = gb + 0.1 * b0
    r = 0.05 * norm(b0) / norm(d)
    torch.testing.assert_close(b.detach(), b0 - 0.3 * r * d)
    assert opt.state[b]["trust_ratio"] == pytest.approx(r, rel=1e-6)


def test_zero_weight_gets_ratio_one():
    w = nn.Parameter(torch.zeros(3, 3))
    opt = LARS([w], lr=0.1, momentum=0.0, eta=0.01)
    w.grad = torch.ones(3, 3)
    opt.step()
    assert opt.state[w]["trust_ratio"] == 1.0
    torch.testing.assert_close(w.detach(), -0.1 * torch.ones(3, 3))


def lamb_reference(w, grads, lr, b1, b2, eps, wd, excluded):
    w = w.double().clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    ratios = []
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
        if excluded:
            r = 1.0
        else:
            u = u + wd * w
            r = norm(w) / norm(u)
        w = w - lr * r * u
        ratios.append(r)
    return w, ratios


def test_lamb_steps_match_the_formula():
    w, b = two_tensors()
    w0, b0 = w.detach().clone(), b.detach().clone()
    lr, betas, eps, wd = 0.01, (0.8, 0.95), 1e-6, 0.1
    opt = LAMB([w, b], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    gw, gb = [], []
    for t in range(3):
        set_grads([w, b], seed=10 + t)
        gw.append(w.grad.clone())
        gb.append(b.grad.clone())
        opt.step()
    ref_w, ratios = lamb_reference(w0, gw, lr, *betas, eps, wd, excluded=False)
    ref_b, _ = lamb_reference(b0, gb, lr, *betas, eps, wd, excluded=True)
    torch.testing.assert_close(w.detach().double(), ref_w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b.detach().double(), ref_b, rtol=1e-5, atol=1e-7)
    assert opt.state[w]["trust_ratio"] == pytest.approx(ratios[-1], rel=1e-5)
    assert opt.state[b]["trust_ratio"] == 1.0


def test_tvlars_factor_curve():
    alpha, lam, delay, gmin = 1.0, 0.1, 50.0, 0.01
    # hand values: 1/(1 + e^{0.1 (t - 50)}) + 0.01
    assert tvlars_factor(0, alpha, lam, delay, gmin) == pytest.approx(1 / (1 + math.exp(-5)) + 0.01)
    assert tvlars_factor(50, alpha, lam, delay, gmin) == pytest.approx(0.5 + 0.01)
    assert tvlars_factor(60, alpha, lam, delay, gmin) == pytest.approx(1 / (1 + math.e) + 0.01)
    assert tvlars_factor(10_000, alpha, lam, delay, gmin) == pytest.approx(gmin)
    # the plateau is 1/alpha + gamma_min, and the curve never increases
    assert tvlars_factor(0, 0.1, 1e-3, 1e4, 0.0) == pytest.approx(1 / 0.1, rel=1e-3)
    curve = [tvlars_factor(t, alpha, lam, delay, gmin) for t in range(0, 200, 5)]
    assert all(a >= b for a, b in zip(curve, curve[1:]))


def test_tvlars_stores_the_factor_in_the_trust_ratio():
    w = nn.Parameter(torch.randn(5, 5))
    opt = TVLARS([w], lr=1.0, momentum=0.0, eta=0.01, alpha=2.0, lam=0.5, delay=2, gamma_min=0.1)
    for t in (1, 2, 3, 4):
        w.grad = torch.randn(5, 5)
        expected = 0.01 * norm(w.detach()) / norm(w.grad) * tvlars_factor(t, 2.0, 0.5, 2, 0.1)
        opt.step()
        assert opt.state[w]["trust_ratio"] == pytest.approx(expected, rel=1e-5)


def test_warmup_cosine_schedule():
    assert warmup_cosine_factor(0, 4, 12) == pytest.approx(0.25)
    assert warmup_cosine_factor(3, 4, 12) == pytest.approx(1.0)
    assert warmup_cosine_factor(4, 4, 12) == pytest.approx(1.0)
    assert warmup_cosine_factor(8, 4, 12) == pytest.approx(0.5)
    assert warmup_cosine_factor(12, 4, 12) == pytest.approx(0.0)
    w = nn.Parameter(torch.randn(2, 2))
    opt = LARS([w], lr=2.0)
    sched = warmup_cosine(opt, warmup_steps=2, total_steps=6)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        w.grad = torch.randn(2, 2)
        opt.step()
        sched.step()
    assert seen == pytest.approx([1.0, 2.0, 2.0, 2.0 * 0.5 * (1 + math.cos(math.pi / 4))])
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(opt, warmup_steps=7, total_steps=6)


@pytest.mark.parametrize("kwargs, bad", [({"lr": -1.0}, "lr"), ({"momentum": 1.0}, "momentum"),
                                         ({"alpha": 0.0}, "alpha"), ({"lam": -0.1}, "lam")])
def test_bad_arguments_are_named(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        TVLARS([nn.Parameter(torch.randn(2, 2))], **{"delay": 10, **kwargs})


def test_monitor_logs_group_lr_times_applied_trust_ratio(tmp_path):
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match="no high plateau"):  # a short plateau, on purpose
        opt = TVLARS(model.parameters(), lr=0.8, momentum=0.9, weight_decay=1e-3, eta=0.05,
                     alpha=0.5, lam=0.3, delay=1.0, gamma_min=0.02)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    mon = monitor.watch(model, opt, logdir=str(tmp_path), config=MonitorConfig.preset("cheap", every=1))
    expected_lr: dict[str, dict[int, float]] = {}
    expected_eff: dict[str, float] = {}
    for step in range(3):
        x, y = torch.randn(16, 6), torch.randn(16, 3)
        nn.functional.mse_loss(model(x), y).backward()
        lr = opt.param_groups[0]["lr"]
        for name, p in model.named_parameters():
            w, g = p.detach().double(), p.grad.detach().double()
            if p.ndim <= 1:
                ratio, d = 1.0, g
            else:
                d = g + 1e-3 * w
                ratio = 0.05 * norm(w) / norm(d) * tvlars_factor(step + 1, 0.5, 0.3, 1.0, 0.02)
            expected_lr.setdefault(name, {})[step] = lr * ratio
            if step == 0:  # empty momentum buffer: the update is lr * ratio * d
                expected_eff[name] = lr * ratio * norm(d) / norm(g)
        opt.step()
        opt.zero_grad()
        sched.step()
    mon.close()
    scalars = read_scalars(str(tmp_path))
    for name, by_step in expected_lr.items():
        logged = scalars[f"lr/{name}"]
        for step, value in by_step.items():
            assert logged[step] == pytest.approx(value, rel=1e-4), (name, step)
        assert scalars[f"lr_effective/{name}"][0] == pytest.approx(expected_eff[name], rel=1e-3)
    # the weights' rates differ from the plain group lr (the test could not pass by accident)
    assert scalars["lr/0.weight"][0] != pytest.approx(0.8, rel=1e-2)


def test_tvlars_defaults_give_plateau_then_decay():
    """With only ``delay`` given, phi starts on the plateau 1/alpha + gamma_min (it started at
    0.5 with the old ``delay=0`` default) and ends at gamma_min = 0.001."""
    w = nn.Parameter(torch.randn(4, 4))
    opt = TVLARS([w], lr=1.0, momentum=0.0, eta=1.0, delay=100)
    group = opt.param_groups[0]
    assert group["lam"] == pytest.approx(0.1) and group["gamma_min"] == pytest.approx(1e-3)
    factors = []
    for _ in range(300):
        w.grad = torch.randn(4, 4)
        ratio = norm(w.detach()) / norm(w.grad)
        opt.step()
        factors.append(opt.state[w]["trust_ratio"] / ratio)
    assert factors[0] == pytest.approx(1.001, rel=1e-3)
    assert factors[49] > 0.99 and factors[99] == pytest.approx(0.501, rel=1e-2)
    assert factors[-1] == pytest.approx(1e-3, rel=1e-2)
    with pytest.raises(TypeError, match="delay"):
        TVLARS([w], lr=1.0)
    with pytest.warns(UserWarning, match="no high plateau"):
        TVLARS([w], lr=1.0, delay=0.0, lam=1e-3)


def test_tvlars_step_is_one_global_counter_from_one():
    """t counts optimizer steps (1 on the first), not a tensor's own updates: a tensor
    without a gradient on the first two steps gets phi_3 on its first update; the counter
    survives a state_dict round trip."""
    a, b = nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(3, 3))
    tv = dict(alpha=1.0, lam=0.5, delay=2.0, gamma_min=0.0)
    opt = TVLARS([a, b], lr=1.0, momentum=0.0, eta=1.0, **tv)
    for _ in range(2):
        a.grad, b.grad = torch.randn(3, 3), None
        opt.step()
    a.grad, b.grad = torch.randn(3, 3), torch.randn(3, 3)
    expected = norm(b.detach()) / norm(b.grad) * tvlars_factor(3, **tv)
    opt.step()
    assert opt.state[b]["trust_ratio"] == pytest.approx(expected, rel=1e-6)
    again = TVLARS([a, b], lr=1.0, momentum=0.0, eta=1.0, **tv)
    again.load_state_dict(opt.state_dict())
    b.grad = torch.randn(3, 3)
    expected = norm(b.detach()) / norm(b.grad) * tvlars_factor(4, **tv)
    again.step()
    assert again.state[b]["trust_ratio"] == pytest.approx(expected, rel=1e-6)
