"""A real two-process torch.distributed (gloo, CPU) job with DDP: rank 0 monitors, rank 1 is
inactive and writes nothing, PSS is refused on every rank with a message."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from monitor import schema
from tests.helpers import read_scalars

def _worker(rank: int, world: int, port: int, root: str) -> None:
    import monitor  # imported in the child

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(
            torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        result = {"rank": rank}
        try:
            monitor.watch(model, opt, os.path.join(root, f"pss-rank{rank}"), pss=True)
            result["pss"] = "accepted"
        except ValueError as err:
            result["pss"] = str(err)
        gen = torch.Generator().manual_seed(rank)  # each rank its own data shard
        with monitor.watch(model, opt, os.path.join(root, "run"), every=2, preset="full") as mon:
            result["type"] = type(mon).__name__
            for _ in range(5):
                x = torch.randn(4, 6, generator=gen)
                loss = model(x).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                mon.log(loss=loss)
            result["step"] = mon.step
        with open(os.path.join(root, f"rank{rank}.json"), "w") as fh:
            json.dump(result, fh)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_rank0_monitors_other_ranks_write_nothing_and_pss_is_refused(tmp_path, monkeypatch):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(sys, "path", [root, *sys.path])
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["type"] for r in results] == ["Monitor", "InactiveMonitor"]
    assert [r["step"] for r in results] == [5, 5]
    for r in results:
        assert "not supported in a torch.distributed job (world size 2)" in r["pss"]
    assert not list(tmp_path.glob("pss-rank*"))  # refused before anything was written
    files = os.listdir(tmp_path / "run")
    assert len([f for f in files if f.startswith("events.out.tfevents")]) == 1  # rank 0's only
    logged = read_scalars(str(tmp_path / "run"))
    # tags carry the model's own names, without DDP's "module." prefix
    assert sorted(logged["grad_norm/0.weight"]) == [0, 2, 4]
    assert sorted(logged[schema.TAG_LOSS]) == [0, 2, 4]
    assert "ntk_eig/2.weight" in logged and not any("module." in tag for tag in logged)
