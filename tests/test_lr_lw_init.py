"""LW-init: gradient magnitudes and multipliers against a hand computation, param groups,
and the monitor's ``lr`` tag for them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import monitor
from monitor.config import MonitorConfig
from monitor.lr import lw_init_multipliers, lw_init_param_groups, measure_init_gradients
from tests.helpers import read_scalars


def linear_1x2(w=(1.0, -2.0), b=0.5):
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([w]))
        model.bias.fill_(b)
    return model


def mse(out, y):
    return ((out.squeeze(1) - y) ** 2).mean()


def test_gradient_magnitudes_and_multipliers_by_hand():
    # y = w.x + b with w = (1, -2), b = 0.5; loss = mean((y - t)^2); dL/dw = 2/B sum r_i x_i
    batches = [(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0.0, 0.0])),
               (torch.tensor([[2.0, 1.0]]), torch.tensor([1.0]))]
    # batch 1: residuals r = (1.5, -1.5): dw = (1.5, -1.5), db = 0
    # batch 2: y = 2 - 2 + 0.5 = 0.5, r = -0.5: dw = (-2, -1), db = -1
    G_w = ((1.5 + 1.5) / 2 + (2 + 1) / 2) / 2  # mean |g| per parameter, averaged over T = 2
    G_b = (0.0 + 1.0) / 2
    model = linear_1x2()
    G = measure_init_gradients(model, batches, mse, T=2)
    assert G == pytest.approx({"weight": G_w, "bias": G_b})
    m = lw_init_multipliers(G)
    raw_w, raw_b = G_w ** -0.5, G_b ** -0.5
    mean = (raw_w + raw_b) / 2
    assert m == pytest.approx({"weight": raw_w / mean, "bias": raw_b / mean})
    assert sum(m.values()) / len(m) == pytest.approx(1.0)  # the documented normalisation


def test_eps_clamps_zero_gradients():
    m = lw_init_multipliers({"a": 0.0, "b": 1e-4}, eps=1e-6)
    raw = {"a": 1e-6 ** -0.5, "b": 1e-4 ** -0.5}
    mean = (raw["a"] + raw["b"]) / 2
    assert m == pytest.approx({k: v / mean for k, v in raw.items()})


def test_measurement_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(3)]
    G = measure_init_gradients(model, batches, nn.functional.cross_entropy, T=3)
    assert set(G) == {n for n, _ in model.named_parameters()}
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], msg=k)
    with pytest.raises(ValueError, match="only 3"):
        measure_init_gradients(model, batches, nn.functional.cross_entropy, T=4)


def test_measurement_zeroes_gradients_between_batches():
    model = linear_1x2()
    batch = (torch.tensor([[2.0, 1.0]]), torch.tensor([1.0]))
    once = measure_init_gradients(model, [batch], mse, T=1)
    twice = measure_init_gradients(model, [batch, batch], mse, T=2)
    assert twice == pytest.approx(once)  # accumulated gradients would double it


def test_param_groups_one_per_tensor_named_and_scheduled():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    mult = {"0.weight": 2.0, "0.bias": 0.5, "2.weight": 1.0, "2.bias": 0.5}
    groups = lw_init_param_groups(model, mult, lr=0.1, weight_decay=1e-4)
    assert [g["name"] for g in groups] == list(mult)
    opt = torch.optim.SGD(groups, momentum=0.9)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2, 0.05, 0.1, 0.05])
    assert all(g["weight_decay"] == 1e-4 for g in opt.param_groups)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, 0.005, 0.01, 0.005])
    with pytest.raises(KeyError, match="2.bias"):
        lw_init_param_groups(model, {k: v for k, v in mult.items() if k != "2.bias"}, lr=0.1)


def test_monitor_logs_lr_times_multiplier(tmp_path):
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    batches = [(torch.randn(16, 5), torch.randint(0, 3, (16,))) for _ in range(4)]
    loss_fn = nn.functional.cross_entropy
    mult = lw_init_multipliers(measure_init_gradients(model, batches, loss_fn, T=4))
    assert max(mult.values()) / min(mult.values()) > 1.05  # distinct rates, so the check bites
    opt = torch.optim.SGD(lw_init_param_groups(model, mult, lr=0.05), momentum=0.9)
    with monitor.watch(model, opt, logdir=str(tmp_path),
                       config=MonitorConfig.preset("cheap", every=1)):
        for x, y in batches[:3]:
            loss_fn(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    scalars = read_scalars(str(tmp_path))
    for name, m in mult.items():
        assert scalars[f"lr/{name}"] == pytest.approx({0: 0.05 * m, 1: 0.05 * m, 2: 0.05 * m})


def test_normalize_over_a_subset():
    """The mean is 1 over the named tensors (e.g. weights only); the others keep their ratio
    to them; unknown or empty names are an error that says what to pass."""
    G = {"0.weight": 0.04, "0.bias": 0.25, "2.weight": 0.01, "2.bias": 1.0}
    weights = ["0.weight", "2.weight"]
    m = lw_init_multipliers(G, normalize_over=weights)
    assert (m["0.weight"] + m["2.weight"]) / 2 == pytest.approx(1.0)
    assert m["0.weight"] == pytest.approx(5 / 7.5) and m["2.bias"] == pytest.approx(1 / 7.5)
    every = lw_init_multipliers(G)
    assert sum(every.values()) / 4 == pytest.approx(1.0)
    assert {n: every[n] / m[n] for n in G} == pytest.approx({n: 7.5 / 4.5 for n in G})
    with pytest.raises(ValueError, match="not measured"):
        lw_init_multipliers(G, normalize_over=["1.weight"])
    with pytest.raises(ValueError, match="empty"):
        lw_init_multipliers(G, normalize_over=[])
