"""Wrapped and distributed models: what :func:`monitor.watch` does with them.

- ``torch.compile``, DDP and DataParallel wrappers are unwrapped, so tags carry the model's
  own parameter names;
- in a ``torch.distributed`` job only rank 0 monitors and writes (after DDP's all-reduce all
  ranks hold the same gradients and weights); other ranks get an :class:`InactiveMonitor`.
  PSS is refused there: every rank would have to smooth, and read the control file, at the
  same step. FSDP and tensor-parallel shards are not supported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class InactiveMonitor:
    """What :func:`monitor.watch` returns on ranks other than 0 of a ``torch.distributed`` job.

    After DDP's all-reduce every rank holds the same gradients and weights, so rank 0 alone
    computes and writes the metrics; the others keep the :class:`monitor.Monitor` API (``log``,
    ``close``, context manager, ``step``) and write nothing."""

    pss = None

    def __init__(self, optimizer: torch.optim.Optimizer, rank: int, start_step: int = 0) -> None:
        self.rank, self.step, self.logdir = rank, start_step, None
        self._hook = optimizer.register_step_post_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.step += 1

    def log(self, **values: Any) -> None:
        pass

    def log_at(self, step: int, **values: Any) -> None:
        pass

    def close(self) -> None:
        self._hook.remove()

    def __enter__(self) -> "InactiveMonitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside ``torch.compile`` (``_orig_mod``) and DDP / DataParallel
    (``module``) wrappers, so that tags carry the model's own parameter names whichever way
    it is run (the parameters, modules and hooks are the same objects)."""
    for _ in range(8):
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed job, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
