"""The monitor in a torch.distributed job: per-rank time and bytes, and FSDP2 = one process.

    python benchmarks/bench_distributed.py            # writes benchmarks/results/distributed.md
    python benchmarks/bench_distributed.py --quick    # a smoke run (smaller model, fewer steps)

On CPU with gloo, world sizes 1, 2 and 4 (real process groups, ``torch.multiprocessing``):

1. Per rank and logged step (preset "full": sigma_max / SR, SJE and NTK at every logged
   step): the monitor's own wall time and CPU time (``time.thread_time`` around the
   optimizer hooks), the bytes it sent or received and its collectives, for FSDP2
   (``fully_shard`` per layer and on the root) and DDP. World 1 is the single-process path.
2. sigma_max of every layer of the FSDP2 model two ways: power iteration on the shards
   (one all-reduce per iteration for all layers) against gathering each matrix on the rank
   that owns it and running the single-process power iteration there.
3. The FSDP2 equality table: the largest relative difference of each metric family against
   the single-process run on the same global batch.

Each rank runs one thread; with more ranks than cores the wall times include waiting for a
core, so the CPU time is the measure of the work per rank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import monitor  # noqa: E402
import monitor.hook  # noqa: E402
from benchmarks.common import md_table, write_results  # noqa: E402
from monitor.config import MonitorConfig  # noqa: E402

POWER_MAX_ITERS = 500  # enough for the flat spectra of the random weights measured here
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "distributed.md")
FULL = {"layers": 8, "width": 384, "batch": 64, "steps": 6, "worlds": (1, 2, 4)}
MODES = {"fsdp": "FSDP2, sigma gathered to the owner", "fsdp-power": "FSDP2, sigma by power "
         "iteration on the shards", "ddp": "DDP"}
QUICK = {"layers": 3, "width": 64, "batch": 16, "steps": 3, "worlds": (1, 2)}


def make_model(layers: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*mods, nn.Linear(width, 10))


def batch(step: int, size: int, width: int) -> torch.Tensor:
    return torch.randn(size, width, generator=torch.Generator().manual_seed(step))


class Clock:
    """Wall and CPU time inside the monitor's two optimizer hooks (patched on the class)."""

    wall = cpu = 0.0

    @classmethod
    def install(cls) -> None:
        for name in ("_pre_step", "_post_step"):
            original = getattr(monitor.hook.Monitor, name)

            def timed(self, *args, _original=original, **kwargs):
                w, c = time.perf_counter(), time.thread_time()
                try:
                    return _original(self, *args, **kwargs)
                finally:
                    cls.wall += time.perf_counter() - w
                    cls.cpu += time.thread_time() - c

            setattr(monitor.hook.Monitor, name, timed)


def run(rank: int, world: int, mode: str, spec: dict, root: str) -> dict:
    """Train ``spec["steps"]`` steps (the first one not measured); this rank's costs."""
    model = make_model(spec["layers"], spec["width"])
    if mode.startswith("fsdp") and world > 1:
        from torch.distributed.fsdp import fully_shard

        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        model = fully_shard(model)
    elif mode == "ddp" and world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    power = {"sharded_sigma": "power", "power_iters": POWER_MAX_ITERS} if mode == "fsdp-power" \
        else {"sharded_sigma": "gather"}  # power: enough iterations to converge (flat spectra)
    config = MonitorConfig.preset("full", every=1, ntk_probe=8, warn_overhead=0, **power)
    mon = monitor.watch(model, opt, os.path.join(root, f"{mode}-w{world}"), config=config)
    comm = mon._dist.comm if mon._dist is not None else None
    per_step = []
    for t in range(spec["steps"]):
        x = batch(t, spec["batch"], spec["width"]).chunk(world)[rank]
        Clock.wall = Clock.cpu = 0.0
        sent, calls = (comm.bytes, comm.calls) if comm else (0, 0)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if t > 0:
            per_step.append((Clock.wall, Clock.cpu, (comm.bytes - sent) if comm else 0,
                             (comm.calls - calls) if comm else 0))
    mon.close()
    out = {k: statistics.mean(s[i] for s in per_step)
           for i, k in enumerate(("wall", "cpu", "bytes", "calls"))}
    if mode == "fsdp" and world > 1:
        out.update(sigma_two_ways(model, mon))
    return out


def sigma_two_ways(model: nn.Module, mon) -> dict:
    """sigma_max of every weight: power iteration on the shards vs gather to the owner."""
    from monitor.distributed import local
    from monitor.metrics import sharded, spectral

    comm, targets = mon._dist.comm, mon._dist.spectral_targets
    blocks = [local(t.param.detach()).reshape(local(t.param).shape[0], -1) for t in targets]
    fro2 = [float(t.param.detach().full_tensor().pow(2).sum()) for t in targets]
    dist.barrier()
    b0, w0 = comm.bytes, time.perf_counter()
    tol = MonitorConfig().power_tol
    power = sharded.power_sigma_rows(blocks, [None] * len(blocks), fro2, comm, tol=tol,
                                     max_iters=POWER_MAX_ITERS)
    w_power, b_power = time.perf_counter() - w0, comm.bytes - b0
    dist.barrier()  # warm start from the converged vectors, as on the next logged step
    b0, w0 = comm.bytes, time.perf_counter()
    sharded.power_sigma_rows(blocks, [p.v for p in power], fro2, comm, tol=tol,
                             max_iters=POWER_MAX_ITERS)
    w_warm, b_warm = time.perf_counter() - w0, comm.bytes - b0
    dist.barrier()
    b0, w0 = comm.bytes, time.perf_counter()
    gathered = {}
    for dst in range(comm.world):
        mine = [t for t in targets if t.owner == dst]
        wholes = sharded.gather_whole([local(t.param.detach()) for t in mine],
                                      [t.param.shape for t in mine], comm, dst)
        for t, w in zip(mine, wholes or []):
            gathered[t.name] = (spectral.power_sigma_max(w).sigma,
                                float(torch.linalg.svdvals(w.double())[0]))
    w_gather, b_gather = time.perf_counter() - w0, comm.bytes - b0
    pairs = [(p.sigma, *gathered[t.name]) for p, t in zip(power, targets) if t.name in gathered]
    diff = max(abs(p - exact) / exact for p, _, exact in pairs)
    diff_gather = max(abs(g - exact) / exact for _, g, exact in pairs)
    return {"power_wall": w_power, "power_bytes": b_power, "warm_wall": w_warm,
            "warm_bytes": b_warm, "power_iters": max(p.iters for p in power), "gather_wall": w_gather,
            "gather_bytes": b_gather, "power_error": diff, "gather_error": diff_gather}


def worker(rank: int, world: int, port: int, spec: dict, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        Clock.install()
        out = {mode: run(rank, world, mode, spec, root) for mode in MODES}
        with open(os.path.join(root, f"w{world}-rank{rank}.json"), "w") as fh:
            json.dump(out, fh)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def equality(root: str, world: int, mode: str) -> dict[str, float]:
    """Largest relative difference per metric family, FSDP2 at ``world`` vs one process.
    NTK: layers owned by rank 0 only (the probe is the owner's first samples)."""
    from tests.helpers import read_scalars

    run = read_scalars(os.path.join(root, f"{mode}-w{world}"))
    ref = read_scalars(os.path.join(root, "fsdp-w1"))
    with open(os.path.join(root, f"{mode}-w{world}", "run.json"), encoding="utf-8") as fh:
        owners = {k: v["owner"] for k, v in json.load(fh)["distributed"]["layers"].items()}
    worst: dict[str, float] = {}
    for tag in run:
        family, _, layer = tag.partition("/")
        if family in ("monitor", "train", "config") or tag not in ref:
            continue
        if family == "ntk_eig" and owners.get(layer) != 0:
            continue
        for step, value in run[tag].items():
            expected = ref[tag][step]
            diff = abs(value - expected) / max(abs(expected), 1e-12)
            worst[family] = max(worst.get(family, 0.0), diff)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    spec = QUICK if args.quick else FULL
    root = tempfile.mkdtemp(prefix="bench-dist-")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])
    results = {}
    for world in spec["worlds"]:
        if world == 1:  # the single-process path, no process group
            torch.set_num_threads(1)
            Clock.install()
            one = run(0, 1, "fsdp", spec, root)  # a plain model: one run for every mode
            results[1] = [{mode: one for mode in MODES}]
            continue
        mp.spawn(worker, args=(world, free_port(), spec, root), nprocs=world, join=True)
        results[world] = [json.load(open(os.path.join(root, f"w{world}-rank{r}.json")))
                          for r in range(world)]
    write_results(RESULTS, "Distributed monitor benchmark (CPU, gloo)", report(spec, results, root))


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``t = a + b / world``."""
    xs, ys = [1 / w for w, _ in points], [t for _, t in points]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def report(spec: dict, results: dict, root: str) -> str:
    n_params = sum(p.numel() for p in make_model(spec["layers"], spec["width"]).parameters())
    body = (f"Model: {spec['layers']} x Linear({spec['width']}, {spec['width']}) + Tanh, then "
            f"Linear({spec['width']}, 10) ({n_params:,} parameters); global batch "
            f"{spec['batch']} split over the ranks; SGD; `every=1`, preset `full` (sigma_max, "
            f"SR, SJE, NTK with an 8-sample probe at every logged step); mean over "
            f"{spec['steps'] - 1} logged steps after the first. One thread per rank.\n\n")
    body += "## Per rank and logged step\n\n"
    rows = []
    for mode in MODES:
        for world, ranks in results.items():
            r = [x[mode] for x in ranks]
            rows.append([MODES[mode], world,
                         f"{1000 * max(x['cpu'] for x in r):.1f}",
                         f"{1000 * statistics.mean(x['cpu'] for x in r):.1f}",
                         f"{1000 * max(x['wall'] for x in r):.1f}",
                         f"{max(x['bytes'] for x in r) / 1e3:.1f}",
                         f"{max(x['calls'] for x in r):.0f}"])
    body += md_table(["job", "world", "CPU ms (max rank)", "CPU ms (mean rank)",
                      "wall ms (max rank)", "kB sent+received (max rank)", "collectives"], rows)
    body += ("\nFit of the CPU time (max rank) to `a + b / world` (least squares): the part b "
             "divides across ranks, a does not.\n\n")
    fits = []
    for mode in MODES:
        a, b = fit([(w, max(x[mode]["cpu"] for x in ranks)) for w, ranks in results.items()])
        fits.append([MODES[mode], f"{1000 * a:.1f}", f"{1000 * b:.1f}", f"{b / (a + b):.1%}"])
    body += md_table(["job", "a (ms)", "b (ms)", "share that divides"], fits)
    body += ("\nBytes are the payload a rank passes to or gets from the monitor's collectives "
             "(object collectives: their pickles); a ring all-reduce moves about twice its "
             "payload on the wire. Wall times include waiting for one of the 2 shared cores.\n")
    sig = [(w, ranks) for w, ranks in results.items() if w > 1]
    if sig:
        body += "\n## sigma_max of every layer: power iteration on the shards vs gather to the owner\n\n"
        rows = []
        for world, ranks in sig:
            f = [x["fsdp"] for x in ranks]
            rows.append([world, f"{1000 * max(x['power_wall'] for x in f):.1f}",
                         f"{max(x['power_bytes'] for x in f) / 1e3:.1f}",
                         f"{max(x['power_iters'] for x in f)}",
                         f"{1000 * max(x['warm_wall'] for x in f):.1f}",
                         f"{max(x['warm_bytes'] for x in f) / 1e3:.1f}",
                         f"{1000 * max(x['gather_wall'] for x in f):.1f}",
                         f"{max(x['gather_bytes'] for x in f) / 1e3:.1f}",
                         f"{max(x['power_error'] for x in f):.1e}",
                         f"{max(x['gather_error'] for x in f):.1e}"])
        body += md_table(["world", "power, cold start: wall ms", "kB (max rank)", "iterations",
                          "power, warm start: wall ms", "kB", "gather: wall ms",
                          "gather: kB (max rank)", "power: max rel. error vs svdvals",
                          "gather: max rel. error"], rows)
        body += (f"\nPower iteration to the default residual tolerance (power_tol = "
                 f"{MonitorConfig().power_tol:g}), at most {POWER_MAX_ITERS} iterations, cold "
                 "start (random init) then warm start from its vectors; gather: each matrix "
                 "on its owner, then the single-process sigma_max there.\n")
        body += "\n## FSDP2 against one process (largest relative difference per metric family)\n\n"
        cols = [(w, mode) for w, _ in sig for mode in ("fsdp", "fsdp-power")]
        table = {c: equality(root, *c) for c in cols}
        fams = sorted({f for c in cols for f in table[c]})
        body += ("\nThe power arm differs from the single process as much as the single process's "
                 "own sigma_max differs from `svdvals` (the gather column of the table above): it "
                 "is the more accurate of the two there; SJE's k = floor(SR) follows.\n\n")
        body += md_table(["metric", *[f"world {w}, {'power' if m.endswith('power') else 'gather'}"
                                      for w, m in cols]],
                         [[f, *[f"{table[c].get(f, math.nan):.1e}" for c in cols]] for f in fams])
    return body


if __name__ == "__main__":
    main()
