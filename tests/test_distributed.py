"""Real torch.distributed jobs (gloo, CPU, ``torch.multiprocessing`` spawn): FSDP2 and DDP.

Every per-layer metric of the distributed run equals what one process computes on the same
global batch (the references run here, in the test process, through the ordinary
single-process monitor); PSS smooths DDP replicas identically and FSDP2 shards into the
shards of the single-process smoothed matrix; a NaN in one rank's local batch is counted;
a rank that stops stepping makes the others' monitor time out, say so and go on.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch.optim.optimizer import register_optimizer_step_pre_hook

import monitor.collectors  # noqa: F401  imported before the fork, not once per rank
import monitor.hook  # noqa: F401
import monitor.pss.distributed  # noqa: F401
import torch.distributed.fsdp  # noqa: F401
from monitor import schema
from monitor.distributed import assign_owners, chunk_rows
from monitor.pss.inputs import read_inputs
from tests import dist_workers as W
from tests.helpers import read_scalars, read_texts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORM_RTOL = 1e-5  # norms: float32 sums in another order
SPECTRAL_RTOL = 1e-4  # sigma_max, SR, SJE, NTK, PSS: same iterates on rounded inputs (SPEC: 0.5%)
NOT_COMPARED = {schema.TAG_LOSS, schema.TAG_MONITOR_SECONDS, schema.TAG_MONITOR_OVERHEAD}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, root, monkeypatch) -> None:
    """``world`` real ranks. Forked, not spawned: a spawned child imports torch again (seconds
    each on a loaded CI machine); the workers set one thread first, as DataLoader workers do."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(sys, "path", [ROOT, *sys.path])
    mp.start_processes(W.worker, args=(world, _free_port(), str(root)), nprocs=world, join=True,
                       start_method="fork")


def _reference(root, name: str, probe: tuple[int, int], steps: int = W.STEPS, nan: bool = False,
               preset_args=None):
    """The single-process run on the whole batch (rank ``probe[0]``'s samples first)."""
    import monitor

    model = W.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config, pss = preset_args or W.monitor_args()
    weights: list[dict] = []  # what each step's metrics see (a global hook runs first)
    handle = register_optimizer_step_pre_hook(lambda *_: weights.append(
        {n: p.detach().clone() for n, p in model.named_parameters()}))
    try:
        with monitor.watch(model, opt, str(root / name), config=config, pss=pss) as mon:
            W.train(model, opt, mon, 0, 1, steps=steps, nan=nan, probe=probe)
    finally:
        handle.remove()
    mon.weights = weights
    return model, mon


def _rtol(tag: str, sigma_rtol: float = SPECTRAL_RTOL) -> float:
    if tag.startswith(("sigma_max/", "stable_rank/")):
        return sigma_rtol
    spectral = ("sje/", "ntk_eig/", "pss_")
    return SPECTRAL_RTOL if tag.startswith(spectral) else NORM_RTOL


def _assert_run_equal(run: dict, refs: list[dict], owners: dict[str, int],
                      sigma_rtol: float = SPECTRAL_RTOL) -> None:
    ref = refs[0]
    assert set(run) - NOT_COMPARED == set(ref) - NOT_COMPARED
    for tag in sorted(set(run) - NOT_COMPARED):
        layer = tag.split("/", 1)[-1]
        expected = (refs[owners[layer]] if tag.startswith("ntk_eig/") else ref)[tag]
        assert sorted(run[tag]) == sorted(expected), tag
        for step, value in run[tag].items():
            assert math.isclose(value, expected[step], rel_tol=_rtol(tag, sigma_rtol),
                                abs_tol=1e-7), (tag, step, value, expected[step])


def _check_world(world: int, tmp_path, monkeypatch) -> dict:
    _spawn(world, tmp_path, monkeypatch)
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    run_info = json.loads((tmp_path / "fsdp" / schema.RUN_FILENAME).read_text())["distributed"]
    owners = {name: v["owner"] for name, v in run_info["layers"].items()}
    assert {v["placement"] for v in run_info["layers"].values()} == {"rows"}
    assert run_info["sigma"] == "gather"  # "auto" on a small model
    assert len(set(owners.values())) > 1  # the work is split
    refs = [_reference(tmp_path, f"ref{r}", (r, world)) for r in range(world)]
    run = read_scalars(str(tmp_path / "fsdp"))
    _assert_run_equal(run, [read_scalars(str(tmp_path / f"ref{r}")) for r in range(world)], owners)
    # PSS: the same interventions, and every rank's shard is its rows of the reference
    model, mon = refs[0]
    assert mon.pss.interventions == [W.SPIKE_AT, W.SPIKE_AT + 1]
    assert all(o["fsdp_interventions"] == mon.pss.interventions for o in out)
    for r in range(world):
        shards = torch.load(tmp_path / f"fsdp-rank{r}.pt")
        for name, p in model.named_parameters():
            rows = p.detach().chunk(world)  # torch.chunk: FSDP2's Shard(0)
            expected = rows[r] if r < len(rows) else p[:0]
            assert shards[name].shape[0] == chunk_rows(p.shape[0], world, r)
            torch.testing.assert_close(shards[name], expected.detach(), rtol=1e-5, atol=1e-6)
    # the detector's input (pss_input.bin): rank 0's alone, equal to the single process's
    got, expected = read_inputs(str(tmp_path / "fsdp")), read_inputs(str(tmp_path / "ref0"))
    assert len(got) == 1 and got[0].steps == expected[0].steps == list(range(W.STEPS))
    assert got[0].settings == expected[0].settings
    for value, ref_value in zip(got[0].values, expected[0].values):
        assert math.isclose(value, ref_value, rel_tol=NORM_RTOL)
    # alerts with update ratios at every step: refused with the fix on every rank, nothing
    # written (alerts themselves: tests/test_distributed_alerts.py)
    assert all("not supported in a torch.distributed job yet" in o["alerts"] for o in out)
    assert all("record_updates=False" in o["alerts"] for o in out)
    assert not (tmp_path / "alerts").exists()
    # a NaN in the last rank's local batch: counted as one process counts it
    _reference(tmp_path, "ref-nan", (0, 1), steps=1, nan=True,
               preset_args=(W.monitor_args()[0].preset("cheap", every=1), None))
    expected_nan = read_scalars(str(tmp_path / "ref-nan"))[schema.TAG_NONFINITE_GRAD][0]
    assert expected_nan > 0
    assert read_scalars(str(tmp_path / "fsdp-nan"))[schema.TAG_NONFINITE_GRAD][0] == expected_nan
    assert read_scalars(str(tmp_path / "ddp-nan"))[schema.TAG_NONFINITE_GRAD][0] == expected_nan
    return {"out": out, "refs": refs}


def test_fsdp2_and_ddp_two_ranks_equal_one_process(tmp_path, monkeypatch):
    found = _check_world(2, tmp_path, monkeypatch)
    # sigma_max by power iteration on the shards: within its residual (1e-3) of the exact
    # sigma_1 of the weights the single process saw; everything else as before
    info = json.loads((tmp_path / "fsdp-power" / schema.RUN_FILENAME).read_text())["distributed"]
    assert info["sigma"] == "power"
    power = read_scalars(str(tmp_path / "fsdp-power"))
    _assert_run_equal(power, [read_scalars(str(tmp_path / f"ref{r}")) for r in (0, 1)],
                      {name: v["owner"] for name, v in info["layers"].items()}, sigma_rtol=math.inf)
    weights = found["refs"][0][1].weights
    for name in ("0.weight", "2.weight", "4.weight"):
        for step, value in power[f"sigma_max/{name}"].items():
            exact = float(torch.linalg.svdvals(weights[step][name].double())[0])
            assert abs(value - exact) <= 2e-3 * exact, (name, step, value, exact)
    # DDP: replicas identical after the interventions, and equal to the single process
    model, mon = found["refs"][0]
    w0, w1 = (torch.load(tmp_path / f"ddp-rank{r}.pt") for r in (0, 1))
    assert all(o["ddp_interventions"] == mon.pss.interventions for o in found["out"])
    for name, p in model.named_parameters():
        assert torch.equal(w0[name], w1[name]), name
        torch.testing.assert_close(w0[name], p.detach(), rtol=1e-5, atol=1e-6)
    ddp = read_scalars(str(tmp_path / "ddp"))
    info = json.loads((tmp_path / "ddp" / schema.RUN_FILENAME).read_text())["distributed"]
    assert {v["placement"] for v in info["layers"].values()} == {"replicated"}
    owners = {name: v["owner"] for name, v in info["layers"].items()}
    _assert_run_equal(ddp, [read_scalars(str(tmp_path / f"ref{r}")) for r in (0, 1)], owners)
    # rank 1 stopped stepping: rank 0's monitor timed out, said so, and training went on
    assert found["out"][0]["dead_steps"] == 2
    failures = read_texts(str(tmp_path / "dead"))[schema.TAG_FAILURE_TEXT + schema.TEXT_SUFFIX]
    assert any("timeout 2 s" in text and "a rank died" in text for text in failures.values())
    assert "call monitor.watch() on every rank" in found["out"][0]["alone"]
    _check_tensor_parallel(tmp_path)
    mixed = read_scalars(str(tmp_path / "mixed"))  # only 0.* is sharded: 2.*, 4.* are named
    assert "grad_norm/0.weight" in mixed and "grad_norm/2.weight" not in mixed
    said = read_texts(str(tmp_path / "mixed"))[schema.TAG_UNSUPPORTED + schema.TEXT_SUFFIX][0]
    assert "2.weight: a plain tensor in a model whose other parameters are DTensors" in said
    assert "fully_shard(model)" in said
    assert os.listdir(tmp_path / "fsdp").count(schema.RUN_FILENAME) == 1
    assert len([f for f in os.listdir(tmp_path / "fsdp") if "tfevents" in f]) == 1  # rank 0's


def _check_tensor_parallel(tmp_path) -> None:
    """Shard(0) (ColwiseParallel) gets every metric but the NTK; Shard(1) (RowwiseParallel)
    its norms only; what is not supported is named once, never a wrong number."""
    import monitor

    model = W.make_tp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with monitor.watch(model, opt, str(tmp_path / "tp-ref"), config=W.monitor_args()[0]) as mon:
        W.train_tp(model, opt, mon)
    run, ref = read_scalars(str(tmp_path / "tp")), read_scalars(str(tmp_path / "tp-ref"))
    missing = {"sigma_max/2.weight", "stable_rank/2.weight", "sje/2.weight", "ntk_eig/2.weight",
               "ntk_eig/0.weight", schema.TAG_NTK_PROBE}  # no layer's NTK: no probe size
    assert set(run) - NOT_COMPARED == set(ref) - NOT_COMPARED - missing
    for tag in set(run) - NOT_COMPARED:
        for step, value in run[tag].items():
            assert math.isclose(value, ref[tag][step], rel_tol=_rtol(tag), abs_tol=1e-7), tag
    said = read_texts(str(tmp_path / "tp"))[schema.TAG_UNSUPPORTED + schema.TEXT_SUFFIX]
    assert sorted(said) == [0]
    assert "ntk_eig/2.weight: spectral metrics of a tensor sharded on a dimension other than 0" in said[0]
    assert "ntk_eig/0.weight: NTK of a tensor-parallel layer" in said[0]


def test_fsdp2_four_ranks_fewer_rows_than_ranks(tmp_path, monkeypatch):
    assert [chunk_rows(3, 4, r) for r in range(4)] == [1, 1, 1, 0]  # layer 4.weight
    _check_world(4, tmp_path, monkeypatch)


def test_assign_owners_balances_and_is_deterministic():
    costs = [100, 1, 50, 50, 1, 1]
    owners = assign_owners(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in (0, 1)]
    assert sorted(loads) == [101, 102] and owners == assign_owners(costs, 2)
    assert assign_owners(costs, 1) == [0] * 6


def _lightning_rank(rank: int, port: int, root: str) -> None:
    """One rank of a job launched from outside, as torchrun does: Lightning reads the rank
    from the environment and starts no process of its own."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                       "NODE_RANK": "0", "LOCAL_RANK": str(rank), "RANK": str(rank)})
    from tests import lightning_ddp_job

    lightning_ddp_job.main(root)


def test_lightning_ddp_two_processes_through_the_callback(tmp_path, monkeypatch):
    """Lightning with strategy="ddp" on 2 CPU processes and the existing callback: every
    rank monitors, rank 0 writes, a smooth-now request smooths both replicas alike."""
    import lightning.pytorch  # noqa: F401  imported before the fork

    monkeypatch.setattr(sys, "path", [ROOT, *sys.path])
    mp.start_processes(_lightning_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    out = [json.loads((tmp_path / f"lit-rank{r}.json").read_text()) for r in (0, 1)]
    assert [o["type"] for o in out] == ["Monitor", "Monitor"]
    assert [o["step"] for o in out] == [7, 7]
    assert out[0]["interventions"] == out[1]["interventions"] == [5]  # polled every 5 steps
    w0, w1 = (torch.load(tmp_path / f"weights-rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(w0[name], w1[name]) for name in w0)
    logged = read_scalars(str(tmp_path))
    assert sorted(logged["grad_norm/net.0.weight"]) == list(range(7))
    assert logged[schema.TAG_PSS_INTERVENTION][5] == 1.0
    assert "ntk_eig/net.2.weight" in logged and "sje/net.0.weight" in logged
    assert len([f for f in os.listdir(tmp_path) if "tfevents" in f]) == 1  # rank 0's only


def test_owned_sigma_not_converged_is_recorded_as_failed_not_logged():
    """A layer's owner computes sigma_max with the single-process method: when it does not
    converge, the layer's sigma_max / SR are a failure for the step (as in one process), and
    SJE, which needs sigma, is skipped."""
    from types import SimpleNamespace

    from monitor import MonitorConfig
    from monitor.collectors import Spectral, StepContext, Target
    from monitor.distributed import REPLICATED
    from monitor.hook import StepRecord

    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(120, 100))  # flat top spectrum: 2 steps do not converge
    config = MonitorConfig.preset("full", every=1, power_iters=2)
    t = Target("w", W, "linear", True, REPLICATED, "", owner=0)
    spectral = Spectral(SimpleNamespace(config=config, rank=0))
    ctx = StepContext(0, StepRecord(0), StepRecord(0), weight_sq={"w": float(W.detach().pow(2).sum())})
    spectral._owned(ctx, t, W.detach())
    assert "w" not in ctx.sigma  # counted (summed over ranks on rank 0), not logged
    assert ctx.own.scalars == {schema.TAG_SIGMA_UNCONVERGED: 1.0}
    assert len(ctx.own.failures) == 1 and ctx.own.failures[0].startswith("stable_rank/w: ")
    assert "raise power_iters" in ctx.own.failures[0]
    assert t.v is not None  # the next logged step goes on from the last iterate
    config = MonitorConfig.preset("full", every=1)  # converged: logged
    spectral = Spectral(SimpleNamespace(config=config, rank=0))
    spectral._owned(ctx, t, W.detach())
    exact = float(torch.linalg.svdvals(W.detach().double())[0])
    assert math.isclose(ctx.sigma["w"], exact, rel_tol=5e-3)
