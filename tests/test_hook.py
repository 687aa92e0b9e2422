"""The hook end to end: values against plain autograd, event files read back by TensorBoard."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

import monitor
from monitor import schema
from monitor.config import MonitorConfig
from tests.helpers import (SmallCNN, all_finite, read_scalars, read_texts, summary_events,
                           tiny_bert, tiny_gpt2)


def mlp(*sizes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def spectral_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.ndim >= 2]


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adamw"])
def test_norms_and_rates_match_autograd_and_weight_copies(tmp_path, opt_name):
    model = mlp(6, 8, 3)
    groups = [{"params": model[0].parameters(), "lr": 0.05},
              {"params": model[2].parameters(), "lr": 0.02}]
    if opt_name == "sgd_momentum":
        opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=1e-3)
    else:
        opt = torch.optim.AdamW(groups, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    mon = monitor.watch(model, opt, tmp_path, config=MonitorConfig.preset("cheap", every=1))
    names = [n for n, _ in model.named_parameters()]
    expected: dict[str, dict[int, float]] = {}

    def put(metric, name, step, value):
        expected.setdefault(schema.layer_tag(metric, name), {})[step] = value

    for step in range(4):
        x, y = torch.randn(10, 6), torch.randn(10, 3)
        nn.functional.mse_loss(model(x), y).backward()
        grads = {n: p.grad.detach().clone().double() for n, p in model.named_parameters()}
        before = {n: p.detach().clone().double() for n, p in model.named_parameters()}
        lrs = {n: g["lr"] for g in opt.param_groups for n, p in model.named_parameters()
               if any(p is q for q in g["params"])}
        opt.step()
        opt.zero_grad()
        sched.step()
        for n, p in model.named_parameters():
            delta = (p.detach().double() - before[n]).norm().item()
            put("grad_norm", n, step, grads[n].norm().item())
            put("param_norm", n, step, before[n].norm().item())
            put("update_ratio", n, step, delta / before[n].norm().item())
            put("lr", n, step, lrs[n])
            put("lr_effective", n, step, delta / grads[n].norm().item())
        global_norm = math.sqrt(sum(g.norm().item() ** 2 for g in grads.values()))
        expected.setdefault(schema.TAG_GLOBAL_GRAD_NORM, {})[step] = global_norm
    mon.close()

    logged = read_scalars(str(tmp_path))
    assert len(expected) == 5 * len(names) + 1
    for tag, series in expected.items():
        assert logged[tag].keys() == series.keys(), tag
        for step, value in series.items():
            assert logged[tag][step] == pytest.approx(value, rel=1e-5, abs=1e-12), (tag, step)
    # the lr really changed between steps (scheduler) and differs between groups
    assert logged["lr/0.weight"][1] == pytest.approx(0.025)
    assert logged["lr/2.weight"][3] == pytest.approx(0.02 / 8)


def _train_hf(model, steps, tokens=12):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return opt, lambda: model(input_ids=torch.randint(0, 64, (4, tokens)),
                              labels=torch.randint(0, 64, (4, tokens))).loss


def _train_cnn(model, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def loss_fn():
        return nn.functional.cross_entropy(model(torch.randn(6, 3, 8, 8)), torch.randint(0, 5, (6,)))

    return opt, loss_fn


@pytest.mark.parametrize("factory", ["gpt2", "bert", "cnn"])
def test_integration_every_tag_present_and_finite(tmp_path, factory):
    model = {"gpt2": tiny_gpt2, "bert": tiny_bert, "cnn": SmallCNN}[factory]()
    opt, loss_fn = (_train_cnn if factory == "cnn" else _train_hf)(model, 3)
    with monitor.watch(model, opt, tmp_path, config=MonitorConfig.preset("full", every=1,
                                                                        ntk_probe=4)) as mon:
        for _ in range(3):
            loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.log(loss=loss)
    logged = read_scalars(str(tmp_path))
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len({id(p) for p in model.parameters()})  # tied weights appear once
    for name in names:
        for metric in ("grad_norm", "param_norm", "lr", "lr_effective"):
            series = logged[schema.layer_tag(metric, name)]
            assert sorted(series) == [0, 1, 2] and all_finite(series), (metric, name)
        nonzero = [s for s, v in logged[f"param_norm/{name}"].items() if v > 0]
        series = logged.get(f"update_ratio/{name}", {})
        assert sorted(series) == nonzero and all_finite(series), name  # undefined at W = 0
    # Every layer of these models supports every metric (position embeddings of arange(T)
    # included); a structural limit would be said once under health/unsupported.
    texts = read_texts(str(tmp_path)).get(schema.TAG_UNSUPPORTED + schema.TEXT_SUFFIX, {})
    unsupported = {line.split(":")[0].removeprefix("- ntk_eig/")
                   for text in texts.values() for line in text.splitlines()}
    assert unsupported == set()
    for name in spectral_names(model):
        for metric in ("stable_rank", "sigma_max", "sje", "ntk_eig"):
            series = logged[schema.layer_tag(metric, name)]
            assert sorted(series) == [0, 1, 2] and all_finite(series), (metric, name)
        assert all(v >= 1 - 1e-4 for v in logged[f"stable_rank/{name}"].values())
        assert all(-1e-6 <= v <= 1 + 1e-6 for v in logged[f"sje/{name}"].values())
        assert all(1 - 1e-4 <= v <= 4 + 1e-4 for v in logged[f"ntk_eig/{name}"].values())
    for tag in (schema.TAG_LOSS, schema.TAG_GLOBAL_GRAD_NORM, schema.TAG_NONFINITE_GRAD,
                schema.TAG_NONFINITE_WEIGHT):
        assert sorted(logged[tag]) == [0, 1, 2] and all_finite(logged[tag])
    assert schema.TAG_METRIC_FAILURES not in logged, read_texts(str(tmp_path))
    if factory == "gpt2":  # HF Conv1D weights are (in, out): the matrix view is transposed
        assert "sje/transformer.h.0.attn.c_attn.weight" in logged
        assert "lm_head.weight" not in names  # tied to transformer.wte.weight


def test_one_event_per_logged_step_no_extra_dirs_and_layout(tmp_path):
    model = mlp(4, 5, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = monitor.watch(model, opt, tmp_path, every=2, preset="full")
    for _ in range(7):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    mon.close()
    mon.close()  # safe twice
    steps = [e.step for e in summary_events(str(tmp_path))
             if any(v.tag.startswith("grad_norm/") for v in e.summary.value)]
    assert steps == [0, 2, 4, 6]
    files = sorted(os.listdir(tmp_path))
    assert all(os.path.isfile(tmp_path / f) for f in files)  # no sub-run directories
    assert [f for f in files if not f.startswith("events.out.tfevents.")] == [schema.RUN_FILENAME]
    layout = [v for e in summary_events(str(tmp_path)) for v in e.summary.value
              if v.tag == "custom_scalars__config__"]
    assert len(layout) == 1


def test_events_are_flushed_as_steps_complete(tmp_path):
    model = mlp(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = monitor.watch(model, opt, tmp_path, every=1, preset="cheap")
    for _ in range(4):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    # Without close(): steps 0..2 are on disk; step 3 waits for mon.log values or close().
    assert sorted(read_scalars(str(tmp_path))["grad_norm/0.weight"]) == [0, 1, 2]
    mon.close()
    assert sorted(read_scalars(str(tmp_path))["grad_norm/0.weight"]) == [0, 1, 2, 3]


class OddModel(nn.Module):
    """Layers that break naive metrics: zero matrix, 1x1 weight, an unused layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.zero = nn.Linear(6, 6, bias=False)
        nn.init.zeros_(self.zero.weight)
        self.zero.weight.requires_grad_(False)
        self.fc2 = nn.Linear(6, 1)
        self.one = nn.Linear(1, 1)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.one(self.fc2(h + self.zero(h)))


def _run_odd(tmp_path, steps, inject=None):
    model = OddModel()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    with monitor.watch(model, opt, tmp_path, config=MonitorConfig.preset("full", every=1,
                                                                        ntk_probe=4)) as mon:
        for step in range(steps):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            if inject is not None:
                inject(model, step)
            opt.step()
            opt.zero_grad()
            mon.log(loss=loss)
    assert mon.step == steps  # the job ran to the end
    texts = read_texts(str(tmp_path)).get(schema.TAG_FAILURE_TEXT + schema.TEXT_SUFFIX, {})
    return read_scalars(str(tmp_path)), texts


def test_odd_layers_zero_matrix_1x1_and_unused(tmp_path):
    steps = 4
    logged, texts = _run_odd(tmp_path, steps)
    # the zero matrix: param_norm 0, spectral metrics recorded as failed at every step
    assert all(v == 0 for v in logged["param_norm/zero.weight"].values())
    assert "stable_rank/zero.weight" not in logged
    assert all("stable_rank/zero.weight" in texts[s] for s in range(steps))
    assert all(v == 1 for v in logged[schema.TAG_METRIC_FAILURES].values())
    # the 1x1 weight: stable rank and SJE exactly 1
    assert logged["stable_rank/one.weight"][0] == pytest.approx(1.0)
    assert logged["sje/one.weight"][0] == pytest.approx(1.0)
    # the unused layer: no gradient metrics, no failure, parameter norm still logged
    assert "grad_norm/unused.weight" not in logged
    assert sorted(logged["param_norm/unused.weight"]) == list(range(steps))
    assert all("unused" not in t for t in texts.values())
    assert sorted(logged["ntk_eig/fc1.weight"]) == list(range(steps))


def test_nonfinite_gradient_mid_run(tmp_path):
    def inject(model, step):
        if step == 3:
            model.fc2.weight.grad[0, 0] = float("inf")

    logged, texts = _run_odd(tmp_path, 6, inject)
    assert logged[schema.TAG_NONFINITE_GRAD][2] == 0
    assert logged[schema.TAG_NONFINITE_GRAD][3] == 1
    assert "sje/fc2.weight" in texts[3] and "sje/fc2.weight" not in texts[2]
    assert math.isinf(logged["grad_norm/fc2.weight"][3])
    # other layers keep logging at that step
    assert math.isfinite(logged["sje/fc1.weight"][3])
    assert math.isfinite(logged["stable_rank/fc2.weight"][3])
    # the update then poisons the weights: counted and recorded, and the job goes on
    assert logged[schema.TAG_NONFINITE_WEIGHT][4] >= 1
    assert "stable_rank/fc2.weight" in texts[5]


def test_nonfinite_weight_mid_run(tmp_path):
    def inject(model, step):
        if step == 2:
            with torch.no_grad():
                model.fc1.weight[0, 0] = float("nan")

    logged, texts = _run_odd(tmp_path, 5, inject)
    assert logged[schema.TAG_NONFINITE_WEIGHT][1] == 0
    assert logged[schema.TAG_NONFINITE_WEIGHT][2] == 1
    assert 2 not in logged["stable_rank/fc1.weight"] and "stable_rank/fc1.weight" in texts[2]
    assert math.isfinite(logged["stable_rank/fc2.weight"][2])  # others keep logging
    assert math.isfinite(logged["sje/fc2.weight"][2])
    assert sorted(logged["param_norm/fc2.weight"]) == list(range(5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters(tmp_path, dtype):
    model = mlp(8, 16, 4).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with monitor.watch(model, opt, tmp_path, config=MonitorConfig.preset("full", every=1,
                                                                        ntk_probe=4)):
        for _ in range(2):
            model(torch.randn(6, 8, dtype=dtype)).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    logged = read_scalars(str(tmp_path))
    for name in spectral_names(model):
        assert all_finite(logged[f"ntk_eig/{name}"]) and all_finite(logged[f"sje/{name}"])
    # sigma_max of the final weights (step 1 logs the weights before its update)
    w = model[0].weight.detach().double()
    assert logged["param_norm/0.weight"][1] == pytest.approx(w.norm().item(), rel=2e-2)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    model = mlp(4, 6, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with monitor.watch(model, opt, tmp_path, config=MonitorConfig.preset("full", every=1,
                                                                        ntk_probe=3)) as mon:
        for _ in range(3):
            for _micro in range(4):
                (model(torch.randn(5, 4)).pow(2).mean() / 4).backward()
            opt.step()
            opt.zero_grad()
    assert mon.step == 3
    logged = read_scalars(str(tmp_path))
    assert sorted(logged["grad_norm/0.weight"]) == [0, 1, 2]
    assert sorted(logged["ntk_eig/0.weight"]) == [0, 1, 2]
    assert logged[schema.TAG_NTK_PROBE][0] == 3


def test_watch_rejects_wrong_arguments(tmp_path):
    model = mlp(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        monitor.watch("model", opt, tmp_path)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        monitor.watch(model, object(), tmp_path)
    with pytest.raises(ValueError, match="conflicts"):
        monitor.watch(model, opt, tmp_path, every=5, config=MonitorConfig(every=10, sje_every=0,
                                                                          ntk_every=0))
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        monitor.watch(model, opt, tmp_path, preset="fast")
    with pytest.raises(ValueError, match="every"):
        monitor.watch(model, opt, tmp_path, every=0)
    with pytest.raises(TypeError, match="pss"):
        monitor.watch(model, opt, tmp_path, pss="on")
    with pytest.raises(ValueError, match="sje_every"):
        MonitorConfig(every=10, sje_every=15)


def test_after_close_training_continues_without_logging(tmp_path):
    model = mlp(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = monitor.watch(model, opt, tmp_path, every=1, preset="cheap")
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    mon.close()
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    assert sorted(read_scalars(str(tmp_path))["grad_norm/0.weight"]) == [0]
    import json

    assert json.loads((tmp_path / schema.RUN_FILENAME).read_text())["status"] == "finished"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; runs on GPU machines")
def test_cuda_full_preset(tmp_path):
    model = mlp(32, 64, 8).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with monitor.watch(model, opt, tmp_path, config=MonitorConfig.preset("full", every=1)) as mon:
        for _ in range(3):
            loss = model(torch.randn(16, 32, device="cuda")).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.log(loss=loss)
    logged = read_scalars(str(tmp_path))
    # Every layer of these models supports every metric (position embeddings of arange(T)
    # included); a structural limit would be said once under health/unsupported.
    texts = read_texts(str(tmp_path)).get(schema.TAG_UNSUPPORTED + schema.TEXT_SUFFIX, {})
    unsupported = {line.split(":")[0].removeprefix("- ntk_eig/")
                   for text in texts.values() for line in text.splitlines()}
    assert unsupported == set()
    for name in spectral_names(model):
        for metric in ("stable_rank", "sigma_max", "sje", "ntk_eig"):
            assert sorted(logged[f"{metric}/{name}"]) == [0, 1, 2]
    assert schema.TAG_METRIC_FAILURES not in logged


def test_step_with_closure_observes_the_closures_gradients(tmp_path):
    """optimizer.step(closure) (Lightning, LBFGS): gradients exist only inside step()."""
    model = mlp(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(5, 4)
    expected = []
    mon = monitor.watch(model, opt, tmp_path, every=1, preset="full")
    for _ in range(3):
        def closure():
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            expected.append(model[0].weight.grad.norm().item())
            return loss

        opt.step(closure)
    mon.close()
    logged = read_scalars(str(tmp_path))
    assert [logged["grad_norm/0.weight"][s] for s in range(3)] == pytest.approx(expected, rel=1e-6)
    assert sorted(logged["sje/0.weight"]) == sorted(logged["ntk_eig/0.weight"]) == [0, 1, 2]


def test_monitor_logs_its_own_cost_and_warns_once_when_it_is_large(tmp_path, monkeypatch, caplog):
    """monitor/seconds and monitor/overhead against a fake clock: SJE costs a known time, a
    training step another, so the logged values are exact whatever the machine's load."""
    from monitor import hook as hook_module
    from monitor.metrics import energy

    clock = [0.0]  # seconds; moves only when the test says so
    monkeypatch.setattr(hook_module.time, "perf_counter", lambda: clock[0])
    delay, train = 0.02, 0.005
    real_sje = energy.sje

    def slow_sje(*args, **kwargs):
        clock[0] += delay  # the monitor's own time
        return real_sje(*args, **kwargs)

    monkeypatch.setattr(energy, "sje", slow_sje)
    model = mlp(8, 16, 16, 4)  # three weight matrices: 3 delays per logged step
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, 8)
    with caplog.at_level("WARNING", logger="monitor"):
        with monitor.watch(model, opt, tmp_path, config=MonitorConfig.preset("full", every=2)) as mon:
            for _ in range(8):
                model(x).pow(2).mean().backward()
                clock[0] += train  # the training step's own time
                opt.step()
                opt.zero_grad()
    logged = read_scalars(str(tmp_path))
    seconds, share = logged[schema.TAG_MONITOR_SECONDS], logged[schema.TAG_MONITOR_OVERHEAD]
    assert sorted(seconds) == sorted(share) == [0, 2, 4, 6]
    for step in (2, 4, 6):  # each interval: two training steps and one logged step's SJE
        assert seconds[step] == pytest.approx(3 * delay)
        assert share[step] == pytest.approx(3 * delay / (3 * delay + 2 * train))
    warnings = [r for r in caplog.records if "of wall time" in r.getMessage()]
    assert len(warnings) == 1 and "warn_overhead" in warnings[0].getMessage()
    assert mon.step == 8


def test_monitor_cost_is_logged_and_warn_overhead_0_never_warns(tmp_path, caplog):
    model = mlp(8, 16, 4)  # so small that the monitor's share of wall time is large
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    config = MonitorConfig.preset("cheap", every=5, warn_overhead=0)
    with caplog.at_level("WARNING", logger="monitor"):
        with monitor.watch(model, opt, tmp_path, config=config):
            for _ in range(20):
                model(torch.randn(4, 8)).sum().backward()
                opt.step()
                opt.zero_grad()
    logged = read_scalars(str(tmp_path))
    assert sorted(logged[schema.TAG_MONITOR_OVERHEAD]) == [0, 5, 10, 15]
    assert all(0 <= v <= 1 for v in logged[schema.TAG_MONITOR_OVERHEAD].values())
    assert not [r for r in caplog.records if "of wall time" in r.getMessage()]
    with pytest.raises(ValueError, match="warn_overhead"):
        MonitorConfig(warn_overhead=-1)


def test_log_at_joins_an_open_record_or_writes_its_own_event(tmp_path):
    model = mlp(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with monitor.watch(model, opt, tmp_path, every=3, preset="cheap") as mon:
        for t in range(7):
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
            if t % 2 == 1:  # an outside logger's interval: not aligned with every=3
                mon.log_at(t, loss=float(t), eval_acc=torch.tensor(0.5))
            if t == 3:
                mon.log_at(t, bad="not a number")
    logged = read_scalars(str(tmp_path))
    assert logged[schema.TAG_LOSS] == {1: 1.0, 3: 3.0, 5: 5.0}
    assert logged["eval_acc"] == {1: 0.5, 3: 0.5, 5: 0.5}
    assert sorted(logged["grad_norm/0.weight"]) == [0, 3, 6]  # the schedule is unchanged
    assert logged[schema.TAG_METRIC_FAILURES][3] == 1  # joined step 3's open record
    texts = read_texts(str(tmp_path))[schema.TAG_FAILURE_TEXT + schema.TEXT_SUFFIX]
    assert "log/bad: cannot convert str" in texts[3]


def test_torch_compiled_model_gets_the_same_tags_and_values(tmp_path):
    """torch.compile (dynamo, aot_eager backend: no C compiler needed): the NTK's module
    hooks still fire, values equal the eager run's, names carry no "_orig_mod." prefix."""
    runs = {}
    for label in ("eager", "compiled"):
        torch.manual_seed(0)
        net = mlp(12, 16, 4)
        model = torch.compile(net, backend="aot_eager") if label == "compiled" else net
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        with monitor.watch(model, opt, tmp_path / label, config=MonitorConfig.preset("full", every=2)):
            for _ in range(5):
                model(torch.randn(8, 12, generator=gen)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
        runs[label] = read_scalars(str(tmp_path / label))
    eager, compiled = runs["eager"], runs["compiled"]
    per_layer = {tag for tag in eager if "/" in tag and tag.split("/")[0] in schema.METRIC_KEYS}
    assert per_layer and per_layer <= set(compiled)
    assert not any("_orig_mod" in tag for tag in compiled)
    for tag in per_layer:
        for step, value in eager[tag].items():
            assert compiled[tag][step] == pytest.approx(value, rel=1e-4, abs=1e-7), (tag, step)
    assert sorted(compiled["ntk_eig/0.weight"]) == [0, 2, 4]


def test_amp_grad_scaler_the_monitor_sees_unscaled_gradients_and_skipped_steps(tmp_path):
    """torch.amp: autocast + GradScaler. scaler.step unscales before optimizer.step, so the
    pre-hook sees the gradients the optimizer applies; a step the scaler skips (inf
    gradients) is no optimizer step and is not counted."""
    runs = {}
    for label in ("plain", "scaled"):
        torch.manual_seed(0)
        model = mlp(10, 16, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) if label == "scaled" else None
        gen = torch.Generator().manual_seed(1)
        with monitor.watch(model, opt, tmp_path / label, every=1, preset="cheap") as mon:
            for t in range(4):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(torch.randn(8, 10, generator=gen)).float().pow(2).mean()
                if scaler is None:
                    loss.backward()
                    opt.step()
                else:
                    scaler.scale(loss).backward()
                    if t == 2:  # an overflow: the scaler skips this step
                        model[0].weight.grad[0, 0] = math.inf
                    scaler.step(opt)
                    scaler.update()
                opt.zero_grad()
        runs[label] = (read_scalars(str(tmp_path / label)), mon.step)
    (plain, plain_steps), (scaled, scaled_steps) = runs["plain"], runs["scaled"]
    assert plain_steps == 4 and scaled_steps == 3
    # the scaled run's steps 0, 1 are the plain run's 0, 1 (same data, same weights)
    for step in (0, 1):
        assert scaled["grad_norm/0.weight"][step] == pytest.approx(plain["grad_norm/0.weight"][step], rel=1e-3)
        assert scaled["lr_effective/0.weight"][step] == pytest.approx(0.05, rel=1e-3)
    assert all_finite(scaled[schema.TAG_GLOBAL_GRAD_NORM])


def test_resumed_job_continues_its_steps_and_supersedes_the_orphaned_ones(tmp_path):
    """A job logs steps 0..6, dies; it is resumed from a checkpoint of step 4 with
    watch(start_step=4). TensorBoard's reader and the dashboard's both show steps 0, 2 from
    the first run and 4, 6 from the resumed one, once each."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dashboard.data import RunReader

    def train(seed, start, stop, spike_at=None, **kw):
        torch.manual_seed(seed)
        model = mlp(6, 8, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        norms = {}
        with monitor.watch(model, opt, tmp_path, every=2, preset="cheap", **kw) as mon:
            assert mon.step == start
            for t in range(start, stop):
                loss = model(torch.randn(5, 6)).pow(2).mean()
                (loss * (100.0 if t == spike_at else 1.0)).backward()  # a gradient spike
                norms[t] = model[0].weight.grad.norm().item()
                opt.step()
                opt.zero_grad()
            assert mon.step == stop
        return norms

    first = train(0, 0, 7)
    _time_passes_for_a_new_event_file_name()
    # a spike at step 5, the resumed job's second: inside its new warm-up of 3 steps
    resumed = train(1, 4, 8, spike_at=5, start_step=4, pss=monitor.PSSConfig(warmup_steps=3))
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("grad_norm/0.weight")
    assert [e.step for e in events] == [0, 2, 4, 6]
    expected = [first[0], first[2], resumed[4], resumed[6]]
    assert [e.value for e in events] == pytest.approx(expected, rel=1e-5)
    reader = RunReader(str(tmp_path))
    reader.refresh()
    table = reader.table()
    rows = table[(table["metric"] == "grad_norm") & (table["layer"] == "0.weight")].sort_values("step")
    assert list(rows["step"]) == [0, 2, 4, 6]
    assert list(rows["value"]) == pytest.approx(expected, rel=1e-5)
    # PSS of the resumed job warms up again (its average is not in the checkpoint): the
    # spike at step 5 (> warmup_steps=3 as a step number) does not trigger
    logged = read_scalars(str(tmp_path))
    assert logged[schema.TAG_PSS_TRIGGER_RATIO][4] == 1.0  # the first value starts the average
    assert not any(logged[schema.TAG_PSS_INTERVENTION].values())
    assert schema.TAG_PSS_EVENTS + schema.TEXT_SUFFIX not in read_texts(str(tmp_path))
    with pytest.raises(ValueError, match="start_step"):
        monitor.watch(mlp(2, 2), torch.optim.SGD(mlp(2, 2).parameters(), lr=0.1), tmp_path,
                      start_step=-1)


def _time_passes_for_a_new_event_file_name():
    """Event file names carry the creation time in seconds: the resumed job's file sorts after."""
    import time as _time

    _time.sleep(1.05)


def test_ntk_memory_cap_skips_the_layers_past_it_and_says_so_once(tmp_path):
    """ntk_max_mb: the first layer's probe fits, the others would pass the cap; the job and
    the first layer's value are as without a cap, the others are named once."""
    runs = {}
    for label, cap_mb in (("uncapped", 0), ("capped", 3.5 / 1024)):  # 3.5 KB
        torch.manual_seed(0)
        model = mlp(32, 64, 64, 4)  # layer 0 holds 8*32 + 8*64 floats = 3 KB; layer 2: 4 KB
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        config = MonitorConfig.preset("full", every=1, ntk_probe=8, ntk_max_mb=cap_mb)
        gen = torch.Generator().manual_seed(1)
        with monitor.watch(model, opt, tmp_path / label, config=config):
            for _ in range(3):
                model(torch.randn(8, 32, generator=gen)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
        runs[label] = read_scalars(str(tmp_path / label)), read_texts(str(tmp_path / label))
    (uncapped, _), (capped, texts) = runs["uncapped"], runs["capped"]
    assert sorted(capped["ntk_eig/0.weight"]) == [0, 1, 2]
    for step in range(3):
        assert capped["ntk_eig/0.weight"][step] == pytest.approx(uncapped["ntk_eig/0.weight"][step])
    assert "ntk_eig/2.weight" in uncapped and "ntk_eig/2.weight" not in capped
    assert "ntk_eig/4.weight" not in capped
    said = texts[schema.TAG_UNSUPPORTED + schema.TEXT_SUFFIX]
    assert list(said) == [0] and "ntk_max_mb" in said[0] and "2.weight" in said[0]
    assert schema.TAG_METRIC_FAILURES not in capped
    with pytest.raises(ValueError, match="ntk_max_mb"):
        MonitorConfig(ntk_max_mb=-1)


def test_a_layer_unfrozen_later_with_add_param_group_gets_its_learning_rate(tmp_path):
    torch.manual_seed(0)
    model = mlp(4, 6, 2)
    model[0].requires_grad_(False)  # frozen at first, as in progressive fine-tuning
    opt = torch.optim.SGD([model[2].weight, model[2].bias], lr=0.1)
    with monitor.watch(model, opt, tmp_path, every=1, preset="cheap"):
        for t in range(4):
            if t == 2:
                model[0].requires_grad_(True)
                opt.add_param_group({"params": [model[0].weight, model[0].bias], "lr": 0.01})
            model(torch.randn(3, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    logged = read_scalars(str(tmp_path))
    assert logged["lr/0.weight"] == {2: pytest.approx(0.01), 3: pytest.approx(0.01)}
    assert sorted(logged["grad_norm/0.weight"]) == [2, 3]
    assert sorted(logged["lr/2.weight"]) == [0, 1, 2, 3]
