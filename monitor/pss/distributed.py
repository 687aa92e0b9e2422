"""PSS in a torch.distributed job (SPEC section 7): one decision, the same smoothing everywhere.

Every rank runs a :class:`DistributedPSSController`. Its inputs are the same on every rank:
the step, the global and per-layer gradient norms (results of an all-reduce, bitwise equal on
all ranks) and the control file, which rank 0 alone reads, with the layers its ``layers``
pattern selects (a match that may time out, so one rank decides), and broadcasts on the
steps it is polled (every ``check_every`` steps). So every rank's detector takes the same decision at the
same step without a broadcast per step.

Smoothing a layer is collective: the rank that owns it (``owners``) holds the whole matrix
(DDP: its replica; FSDP2: the shards gathered from every rank), smooths it with the very
function the single-process controller uses, and sends the result back (DDP: the whole
matrix broadcast, so replicas stay bitwise identical; FSDP2: each rank its own rows, so the
shards are the shards of the single-process smoothed matrix). A failure on the owner is
broadcast with the result, so every rank reports the layer as not smoothed and no rank waits
for a collective the others skip.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from monitor.distributed import ROWS, Comm, local
from monitor.metrics import sharded, views
from monitor.pss.controller import PSSController
from monitor.pss.smoothing import smooth_matrix, weight_from_matrix


class _NoInputLog:
    """Stands for ``monitor.pss.inputs.InputLog`` on the ranks that do not write."""

    def append(self, step: int, value: float) -> None:
        pass

    def settings(self, tau: float, alpha: float, warmup_steps: int) -> None:
        pass

    def close(self) -> None:
        pass


class DistributedPSSController(PSSController):
    """:class:`PSSController` for one rank of a distributed job.

    Args (besides PSSController's):
        comm: the monitor's :class:`monitor.distributed.Comm`.
        placements: ``{name: placement kind}`` of the layers PSS may smooth.
        owners: ``{name: rank}`` that smooths each layer.
    """

    def __init__(self, *args: Any, comm: Comm, placements: dict[str, str],
                 owners: dict[str, int], **kwargs: Any) -> None:
        self.comm, self.placements, self.owners = comm, placements, owners
        super().__init__(*args, **kwargs)

    def _input_log(self, start_step: int) -> Any:
        """Rank 0 records the detector's input (the same on every rank); the others none."""
        return super()._input_log(start_step) if self.comm.rank == 0 else _NoInputLog()

    def _start_control(self) -> None:
        """Rank 0 reads (or writes) control.json; every rank starts from its settings."""
        if self.comm.rank == 0:
            super()._start_control()
        state = (self.config, self.watcher.version, self.watcher.smooth_now_seen,
                 self._in_force, [name for name, *_ in self.selected])
        config, version, seen, in_force, names = self.comm.broadcast_object(
            state if self.comm.rank == 0 else None)
        if self.comm.rank != 0:
            self.config, self._in_force, self.selected = config, in_force, self._named(names)
            for det in [self.detector]:
                det.tau, det.alpha, det.warmup_steps = config.tau, config.alpha, config.warmup_steps
            self.watcher.version, self.watcher.smooth_now_seen = version, seen
            # rank 0 logs its first step for its start-up messages: every rank must log it
            # too (a logged step's update norms are an all-reduce)
            self._pending.force_log = True

    def _poll(self, step: int) -> tuple[Any, list | None]:
        """Rank 0 checks the control file (every ``check_every`` steps) and matches its
        ``layers`` pattern, which may time out (``monitor.patterns``); every rank gets the
        outcome and the selected names, so all decide and smooth alike."""
        if step % self.watcher.check_every != 0:
            return None, None
        update, selected = super()._poll(step) if self.comm.rank == 0 else (None, None)
        names = None if selected is None else [name for name, *_ in selected]
        update, names = self.comm.broadcast_object((update, names) if self.comm.rank == 0 else None)
        return update, None if names is None else self._named(names)

    def _named(self, names: list[str]) -> list[tuple[str, nn.Parameter, str]]:
        """Rank 0's selection (by name) as this rank's ``(name, param, kind)``."""
        wanted = set(names)
        return [(name, p, self.kinds.get(name, "other")) for name, p in self.named if name in wanted]

    def _smooth_layer(self, name: str, p: nn.Parameter, kind: str, params: dict) -> dict[str, float]:
        with self.comm.in_step(f"smoothing of {name}"):
            ok, info = self._smooth_collective(p, kind, params, self.owners.get(name, 0),
                                               self.placements.get(name) == ROWS)
        if not ok:  # raised on every rank alike: the layer is reported as not smoothed
            raise ValueError(info)
        return info

    def _smooth_collective(self, p: nn.Parameter, kind: str, params: dict, owner: int,
                           rows: bool) -> tuple[bool, Any]:
        mine = self.comm.rank == owner
        whole = None
        if rows:
            gathered = sharded.gather_whole([local(p).detach()], [p.shape], self.comm, owner)
            whole = gathered[0] if gathered is not None else None
        elif mine:
            whole = p.detach()
        outcome: tuple[bool, Any] = (False, "not computed")
        M_new = None
        if mine:
            try:
                cfg = self.config
                M_new, info = smooth_matrix(views.matrix_view(whole, kind), cfg.method,
                                            k_min=cfg.k_min, k_max=cfg.k_max, **params)
                if not torch.isfinite(M_new).all():  # never write NaN/inf into the model
                    raise ValueError("the smoothed weight has non-finite entries; the weight "
                                     "was kept")
                outcome = (True, info)
            except Exception as err:  # reported by every rank, below
                outcome = (False, f"{err} (on rank {owner})")
        ok, info = self.comm.broadcast_object(outcome, src=owner)
        if not ok:
            return ok, info
        new_whole = weight_from_matrix(M_new, whole, kind) if mine else None
        with torch.no_grad():
            if rows:
                part = sharded.scatter_whole([new_whole] if mine else None, [p.shape],
                                             self.comm, owner)[0]
                local(p).copy_(part.to(local(p).dtype))
            else:
                buf = (new_whole if mine else torch.empty(p.shape)).to(self.comm.device, torch.float32)
                self.comm.broadcast_tensor(buf, src=owner)
                p.copy_(buf.to(device=p.device, dtype=p.dtype))
        return ok, info
