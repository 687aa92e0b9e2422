"""What the spawned ranks of tests/test_distributed_sharded.py run (importable by spawn)."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from torch import nn

GLOBAL_BATCH = 16
STEPS = 5
SPIKE_AT = 3  # the loss is scaled by 50 at this step: PSS triggers (warm-up 2, tau 1.5)


def make_model() -> nn.Sequential:
    """Rows 9, 5 and 3: uneven shards at world 2 and 4, fewer rows than ranks at world 4."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 3))


def batch(step: int, nan: bool = False) -> torch.Tensor:
    x = torch.randn(GLOBAL_BATCH, 6, generator=torch.Generator().manual_seed(100 + step))
    if nan:
        x[GLOBAL_BATCH - 1, 2] = float("nan")  # the last rank's local batch only
    return x


def monitor_args(**overrides):
    from monitor import MonitorConfig, PSSConfig

    return (MonitorConfig.preset("full", every=1, ntk_probe=4, **overrides),
            PSSConfig(warmup_steps=2, tau=1.5, k_min=2))


#: sigma_max by power iteration on the shards, to a residual of 1e-3
POWER = {"sharded_sigma": "power", "power_tol": 1e-3, "power_iters": 400}


def train(model: nn.Module, opt, mon, rank: int, world: int, steps: int = STEPS,
          nan: bool = False, probe: tuple[int, int] = (0, 1)) -> None:
    """Each rank its chunk of the global batch. ``probe=(r, w)``: the single-process
    reference puts rank r's samples (of a w-rank job) first, so its NTK probe is rank r's;
    the gradient of the whole batch is the same."""
    for t in range(steps):
        x = batch(t, nan).chunk(world)[rank]
        x = torch.roll(x, -probe[0] * (GLOBAL_BATCH // probe[1]), dims=0)
        loss = model(x).pow(2).mean() * (50.0 if t == SPIKE_AT else 1.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.log(loss=loss)


def fsdp(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in (model[0], model[2], model[4]):
        fully_shard(block)
    return fully_shard(model)


def worker(rank: int, world: int, port: int, root: str) -> None:
    import monitor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        config, pss = monitor_args()
        out: dict = {"rank": rank}
        # FSDP2: metrics and PSS, weights after the intervention; sigma_max gathered ("auto")
        # and, at world 2, by power iteration on the shards too
        for name, args in [("fsdp", monitor_args())] + ([("fsdp-power", monitor_args(**POWER))]
                                                          if world == 2 else []):
            model = fsdp(make_model())
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            os.makedirs(os.path.join(root, name), exist_ok=True)  # as on a shared file system
            with monitor.watch(model, opt, os.path.join(root, name), config=args[0],
                               pss=args[1]) as mon:
                train(model, opt, mon, rank, world)
                out[f"{name}_interventions"] = list(mon.pss.interventions)
            torch.save({n: p.to_local().clone() for n, p in model.named_parameters()},
                       os.path.join(root, f"{name}-rank{rank}.pt"))
        # a NaN in the last rank's local batch: counted
        for name, wrap in (("fsdp-nan", fsdp), ("ddp-nan", nn.parallel.DistributedDataParallel)):
            model = wrap(make_model())
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            with monitor.watch(model, opt, os.path.join(root, name), every=1, preset="cheap") as mon:
                train(model, opt, mon, rank, world, steps=1, nan=True)
        try:  # update ratios at every step: refused on every rank, before anything is written
            from monitor.flight import AlertConfig

            monitor.watch(make_model(), torch.optim.SGD(make_model().parameters(), lr=0.1),
                          os.path.join(root, "alerts"), alerts=AlertConfig(record_updates=True))
        except ValueError as err:
            out["alerts"] = str(err)
        if world == 2:
            _tensor_parallel(world, root)
            _mixed(root)
            _ddp_and_timeout(rank, world, root, config, pss, out)
        with open(os.path.join(root, f"rank{rank}.json"), "w") as fh:
            json.dump(out, fh)
    finally:
        dist.destroy_process_group()


def _ddp_and_timeout(rank, world, root, config, pss, out) -> None:
    import monitor

    model = nn.parallel.DistributedDataParallel(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with monitor.watch(model, opt, os.path.join(root, "ddp"), config=config, pss=pss) as mon:
        train(model, opt, mon, rank, world)
        out["ddp_interventions"] = list(mon.pss.interventions)
    torch.save({n: p.detach().clone() for n, p in model.module.named_parameters()},
               os.path.join(root, f"ddp-rank{rank}.pt"))
    # rank 1 stops stepping: rank 0's monitor times out (its own group), says so, goes on
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    from monitor import MonitorConfig

    with monitor.watch(model, opt, os.path.join(root, "dead"),
                       config=MonitorConfig.preset("cheap", every=1, dist_timeout_s=2.0)) as mon:
        if rank == 0:
            train(model, opt, mon, rank, world, steps=2)
            out["dead_steps"] = mon.step
    dist.barrier()
    if rank == 0:  # watch() on one rank only: a clear error, not a hang (last: groups differ now)
        try:
            monitor.watch(model, opt, os.path.join(root, "alone"),
                          config=MonitorConfig.preset("cheap", dist_timeout_s=2.0))
        except RuntimeError as err:
            out["alone"] = str(err)
    dist.barrier()


def make_tp_model() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def train_tp(model: nn.Module, opt, mon, steps: int = 2) -> None:
    """Tensor parallel: every rank sees the whole batch."""
    for t in range(steps):
        loss = model(batch(t)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def _tensor_parallel(world: int, root: str) -> None:
    """ColwiseParallel (weight Shard(0)) then RowwiseParallel (weight Shard(1))."""
    import monitor
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    model = parallelize_module(make_tp_model(), init_device_mesh("cpu", (world,)),
                               {"0": ColwiseParallel(), "2": RowwiseParallel()})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with monitor.watch(model, opt, os.path.join(root, "tp"), config=monitor_args()[0]) as mon:
        train_tp(model, opt, mon)


def _mixed(root: str) -> None:
    """fully_shard on the first block only: the other blocks' plain tensors are named."""
    import monitor
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model[0])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with monitor.watch(model, opt, os.path.join(root, "mixed"), every=1, preset="cheap") as mon:
        train(model, opt, mon, dist.get_rank(), dist.get_world_size(), steps=1)
