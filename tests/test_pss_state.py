"""Resetting a smoothed tensor's optimizer state: the next step is a fresh optimizer's."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import monitor
from monitor.pss import reset_optimizer_state
from monitor.schema import PSSConfig

OPTIMIZERS = {
    "sgd-momentum-dampening": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.5),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, amsgrad=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
}


def train(opt, params, steps):
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_reset_zeroes_the_first_moment_and_keeps_the_rest(name):
    make = OPTIMIZERS[name]
    a, b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(4))
    opt = make([a, b])
    train(opt, [a, b], 7)
    a_state, b_state = copy.deepcopy(opt.state[a]), copy.deepcopy(opt.state[b])
    assert reset_optimizer_state(opt, a) is True
    for key, value in opt.state[a].items():
        if key in ("exp_avg", "momentum_buffer"):
            assert (value == 0).all(), key
        else:  # second moments and the step count are kept
            torch.testing.assert_close(value, a_state[key])
    for key, value in opt.state[b].items():  # other parameters untouched
        torch.testing.assert_close(value, b_state[key])
    assert reset_optimizer_state(opt, nn.Parameter(torch.ones(2))) is False  # no state yet


def test_adams_next_step_after_a_reset_is_small_not_lr_sign_g():
    """Issue 11: dropping the whole state made the next step lr * sign(g) per entry, the
    largest step Adam takes, right after a spike. Keeping v, it is (1 - b1) / (1 - b1^t)
    times g / sqrt(v_hat): checked against that formula, in float64."""
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    lr, (b1, b2), eps = 0.01, (0.9, 0.95), 1e-8
    opt = torch.optim.AdamW([a], lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.0)
    train(opt, [a], 50)
    reset_optimizer_state(opt, a)
    v, t = opt.state[a]["exp_avg_sq"].clone(), int(opt.state[a]["step"]) + 1
    g = torch.randn(5, 3, dtype=torch.float64)
    start = a.detach().clone()
    a.grad = g.clone()
    opt.step()
    v_hat = (b2 * v + (1 - b2) * g * g) / (1 - b2 ** t)
    expected = lr * ((1 - b1) * g / (1 - b1 ** t)) / (v_hat.sqrt() + eps)
    torch.testing.assert_close(start - a.detach(), expected, rtol=1e-9, atol=1e-12)
    assert (start - a.detach()).abs().max() < 0.35 * lr  # a fresh optimizer's: exactly lr


def test_reset_rejects_a_non_optimizer():
    with pytest.raises(TypeError, match="expected a torch.optim.Optimizer"):
        reset_optimizer_state(object(), nn.Parameter(torch.ones(1)))


def test_the_controller_resets_only_smoothed_tensors(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    cfg = PSSConfig(warmup_steps=5, reset_optimizer_state=True)
    with monitor.watch(model, opt, tmp_path, every=5, preset="cheap", pss=cfg) as mon:
        for step in range(11):
            opt.zero_grad()
            (nn.functional.mse_loss(model(x), y) * (30.0 if step == 10 else 1.0)).backward()
            opt.step()  # step 10 triggers: the weights' first moments restart from zero
    assert mon.pss.interventions == [10]
    for name, p in model.named_parameters():
        state = opt.state[p]
        assert int(state["step"]) == 11  # kept
        restarted = torch.allclose(state["exp_avg"], 0.1 * p.grad)
        assert restarted == name.endswith("weight"), name  # only smoothed matrices
