"""Alerts, the flight recorder and ``health/sigma_unconverged`` in a real torch.distributed
job (2 gloo processes, DDP, forked as in tests/test_distributed.py).

Rank 0 decides each step's firings on the all-reduced values and alone writes; the firing
reaches every rank at the same step, so every rank calls ``on_alert`` and logs the same
flight-recorder steps (their collectives stay matched); a callback that raises on one rank
does not stop or hang the other."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import monitor
import monitor.collectors  # noqa: F401  imported before the fork, not once per rank
from monitor import schema
from monitor.flight import AlertConfig
from tests import dist_workers as W
from tests.helpers import read_scalars, read_texts
from tests.test_distributed import ROOT, _free_port

STEPS, SPIKE, EVERY, RECORD = 30, 22, 10, 3
CHEAP_UNCONVERGED = {"power_iters": 2}  # 2 Lanczos steps: no random-init layer converges


def _wide_model() -> nn.Sequential:
    """Matrices wider than spectral.EXACT_SIGMA_MAX_DIM (smaller ones get an exact SVD)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(80, 96), nn.Tanh(), nn.Linear(96, 72))


def _train(model, opt, mon, rank: int, world: int, steps: int = STEPS) -> None:
    for t in range(steps):
        x = W.batch(t).chunk(world)[rank]
        if model_inputs(model) == 80:
            x = x.repeat(1, 14)[:, :80]
        loss = model(x).pow(2).mean() * (50.0 if t == SPIKE else 1.0)  # a planted spike
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.log(loss=loss)


def _alert_rank(rank: int, world: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        out: dict = {"fired": [], "rank": rank}

        def on_alert(alert) -> None:
            out["fired"].append([alert.rule, alert.step])
            if rank == 1:  # the user's callback fails on one rank only
                raise RuntimeError("callback failed on rank 1")

        model = nn.parallel.DistributedDataParallel(W.make_model())
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        alerts = AlertConfig(rules=(monitor.alerts.AlertRule(
            "grad_norm_spike", "train/grad_norm", "ratio", threshold=7.0, warmup_steps=5),),
            record_steps=RECORD)
        with monitor.watch(model, opt, os.path.join(root, "alerts"), every=EVERY, preset="cheap",
                           alerts=alerts, on_alert=on_alert) as mon:
            _train(model, opt, mon, rank, world)
        out["steps"] = mon.step
        out["callback_errors"] = mon._alerting.callback_errors
        # sigma_max that misses power_tol on layers owned by both ranks: counted over all
        config = monitor.MonitorConfig.preset("cheap", every=1, **CHEAP_UNCONVERGED)
        model = nn.parallel.DistributedDataParallel(_wide_model())
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with monitor.watch(model, opt, os.path.join(root, "unconverged"), config=config) as mon:
            _train(model, opt, mon, rank, world, steps=2)
        _pss_patterns(rank, root, out)
        _resumed_pss(rank, world, root)
        _hanging_callback(rank, world, root, out)
        with open(os.path.join(root, f"rank{rank}.json"), "w") as fh:
            json.dump(out, fh)
    finally:
        dist.destroy_process_group()


def _pss_patterns(rank: int, root: str, out: dict) -> None:
    """PSS's ``layers`` from control.json: a stalling pattern (refused), then a valid one
    (applied): rank 0 matches, every rank gets the same selection."""
    from monitor.schema import PSSConfig, write_control
    from tests.test_patterns import HOSTILE_NAME, OVERLAPPING, Named

    model = nn.parallel.DistributedDataParallel(Named())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    logdir = os.path.join(root, "patterns")
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(rank))
    with monitor.watch(model, opt, logdir, every=5, preset="cheap",
                       pss=PSSConfig(layers="net", warmup_steps=2)) as mon:
        for step in range(16):
            if rank == 0 and step in (3, 8):
                write_control(logdir, PSSConfig(layers=OVERLAPPING if step == 3 else "a+!",
                                                warmup_steps=2))
            model(x).backward()
            opt.step()
            opt.zero_grad()
            if step == 7:
                out["selected_after_hostile"] = [name for name, *_ in mon.pss.selected]
    out["selected_at_end"] = [name for name, *_ in mon.pss.selected]
    out["hostile_name"] = HOSTILE_NAME


def _resumed_pss(rank: int, world: int, root: str) -> None:
    """Resumed at a step that is not logged, with PSS: rank 0's start-up messages make it
    log that step; every rank must, or rank 0's update-norm all-reduce runs alone."""
    model = nn.parallel.DistributedDataParallel(W.make_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    config = monitor.MonitorConfig.preset("cheap", every=EVERY, dist_timeout_s=2.0)
    with monitor.watch(model, opt, os.path.join(root, "resumed"), config=config,
                       pss=monitor.PSSConfig(), start_step=3) as mon:
        _train(model, opt, mon, rank, world, steps=3)


def _hanging_callback(rank: int, world: int, root: str, out: dict) -> None:
    """Rank 1's callback hangs for 3 s: rank 0's monitor waits dist_timeout_s (1 s) at most,
    says so, and both ranks finish training."""
    def on_alert(alert) -> None:
        if rank == 1:
            time.sleep(3.0)

    model = nn.parallel.DistributedDataParallel(W.make_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    config = monitor.MonitorConfig.preset("cheap", every=EVERY, dist_timeout_s=1.0)
    rule = monitor.alerts.AlertRule("spike", "train/grad_norm", threshold=7.0, warmup_steps=5)
    start = time.monotonic()
    with monitor.watch(model, opt, os.path.join(root, "hanging"), config=config,
                       alerts=AlertConfig(rules=(rule,), record_steps=RECORD),
                       on_alert=on_alert) as mon:
        _train(model, opt, mon, rank, world)
    out["hanging"] = {"steps": mon.step, "seconds": time.monotonic() - start}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_alerts")
    mp_patch = pytest.MonkeyPatch()
    mp_patch.setenv("PYTHONPATH", os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    mp_patch.setattr(sys, "path", [ROOT, *sys.path])
    try:
        mp.start_processes(_alert_rank, args=(2, _free_port(), str(root)), nprocs=2, join=True,
                           start_method="fork")
    finally:
        mp_patch.undo()
    return root, [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.timeout(120)
def test_a_spike_fires_at_the_same_step_on_both_ranks_and_rank_0_writes_it(two_ranks):
    root, out = two_ranks
    assert [o["fired"] for o in out] == [[["grad_norm_spike", SPIKE]]] * 2
    assert [o["steps"] for o in out] == [STEPS, STEPS]  # rank 1's raising callback: no stop
    assert [o["callback_errors"] for o in out] == [0, 1]
    run = str(root / "alerts")
    scalars = read_scalars(run)
    assert scalars[schema.alert_tag("grad_norm_spike")] == {SPIKE: 1.0}
    events = read_texts(run)[schema.TAG_ALERT_EVENTS + schema.TEXT_SUFFIX]
    assert list(events) == [SPIKE] and "grad_norm_spike" in events[SPIKE]
    # the flight recorder: the RECORD steps before (the ring) and after the firing are
    # logged besides every EVERY-th step; after it with the whole tensors' norms (every rank
    # took part in their collectives: both ranks logged the same steps)
    logged = sorted(scalars["grad_norm/0.weight"])
    around = list(range(SPIKE - RECORD, SPIKE + RECORD + 1))
    assert logged == sorted({*range(0, STEPS, EVERY), *around}), logged
    assert sorted(scalars["update_ratio/0.weight"]) == sorted(
        {*range(0, STEPS, EVERY), *range(SPIKE + 1, SPIKE + RECORD + 1)})
    # the global norm the rule saw is the whole batch's: as one process computes it
    ref = _single_process(root)
    for step in around:
        assert scalars[schema.TAG_GLOBAL_GRAD_NORM][step] == pytest.approx(
            ref[step], rel=1e-5), step
    assert len([f for f in os.listdir(run) if "tfevents" in f]) == 1  # rank 0's only


def _single_process(root) -> dict[int, float]:
    """The global gradient norm of each step, one process on the whole batch."""
    model = W.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with monitor.watch(model, opt, str(root / "ref"), every=1, preset="cheap") as mon:
        _train(model, opt, mon, 0, 1)
    return read_scalars(str(root / "ref"))[schema.TAG_GLOBAL_GRAD_NORM]


@pytest.mark.timeout(120)
def test_sigma_unconverged_counts_every_ranks_layers(two_ranks):
    root, _ = two_ranks
    model = _wide_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    config = monitor.MonitorConfig.preset("cheap", every=1, **CHEAP_UNCONVERGED)
    with monitor.watch(model, opt, str(root / "unconverged-ref"), config=config) as mon:
        _train(model, opt, mon, 0, 1, steps=2)
    run = json.loads((root / "unconverged" / schema.RUN_FILENAME).read_text())
    owners = {v["owner"] for v in run["distributed"]["layers"].values()}
    assert owners == {0, 1}  # both ranks own spectral layers
    expected = read_scalars(str(root / "unconverged-ref"))[schema.TAG_SIGMA_UNCONVERGED]
    assert expected[0] == 2.0  # both matrices
    got = read_scalars(str(root / "unconverged"))[schema.TAG_SIGMA_UNCONVERGED]
    assert got == expected


def model_inputs(model: nn.Module) -> int:
    first = next(m for m in getattr(model, "module", model).modules() if isinstance(m, nn.Linear))
    return first.in_features


@pytest.mark.timeout(120)
def test_a_hanging_callback_on_one_rank_does_not_hang_the_other(two_ranks):
    root, out = two_ranks
    assert [o["hanging"]["steps"] for o in out] == [STEPS, STEPS]
    assert out[0]["hanging"]["seconds"] < 20  # the 3 s callback, a 1 s timeout or two
    failures = read_texts(str(root / "hanging"))[schema.TAG_FAILURE_TEXT + schema.TEXT_SUFFIX]
    assert any("timeout 1 s" in text for text in failures.values()), failures


@pytest.mark.timeout(120)
def test_a_stalling_pss_pattern_is_refused_alike_on_every_rank(two_ranks):
    root, out = two_ranks
    assert [o["selected_after_hostile"] for o in out] == [["net.weight"]] * 2
    assert [o["selected_at_end"] for o in out] == [[out[0]["hostile_name"]]] * 2
    notes = "\n".join(read_texts(str(root / "patterns"))[schema.TAG_PSS_CONTROL_TEXT
                                                         + schema.TEXT_SUFFIX].values())
    assert "layers '(a|aa)+$' refused" in notes and "previous settings kept" in notes, notes


@pytest.mark.timeout(120)
def test_resuming_with_pss_at_an_unlogged_step_keeps_the_ranks_in_step(two_ranks):
    root, _ = two_ranks
    texts = read_texts(str(root / "resumed"))
    assert schema.TAG_FAILURE_TEXT + schema.TEXT_SUFFIX not in texts, texts
    assert sorted(read_scalars(str(root / "resumed"))["update_ratio/0.weight"]) == [3]
