"""Ranks, wrappers and placements: what the monitor needs to know about a distributed job.

- ``torch.compile``, DDP and DataParallel wrappers are unwrapped (:func:`unwrap_model`), so
  tags carry the model's own parameter names; FSDP2's ``fully_shard`` keeps the module and
  its names, and turns parameters into DTensors sharded on dim 0.
- :func:`placement` says how a tensor is laid out across ranks: ``replicated`` (a plain
  tensor under DDP, a ``Replicate`` DTensor), ``rows`` (``Shard(0)`` on a one-dimensional
  mesh over the whole job: FSDP2, ColwiseParallel), ``sharded`` (another dimension, say
  RowwiseParallel's ``Shard(1)``: norms only) or ``unsupported`` (a 2-D mesh: HSDP), never a
  wrong number.
- :class:`Comm` holds the monitor's own process group, with a timeout so that a dead rank
  cannot hang the others forever in the monitor's collectives, and the rank assignment of
  the per-layer work (:func:`assign_owners`).

Importing this module does not import torch.distributed's optional parts; it works in a
job without torch.distributed.
"""

from __future__ import annotations

import contextlib
import datetime
import heapq
import logging
import pickle
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

log = logging.getLogger("monitor")

REPLICATED, ROWS, SHARDED, UNSUPPORTED = "replicated", "rows", "sharded", "unsupported"


class InactiveMonitor:
    """A monitor that computes and writes nothing, with the :class:`monitor.Monitor` API
    (``log``, ``log_at``, ``close``, context manager, ``step``).

    Kept for code that builds one on ranks it does not want monitored; :func:`monitor.watch`
    itself returns a working :class:`monitor.Monitor` on every rank (each computes a share
    of the metrics, rank 0 writes)."""

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


class NullWriter:
    """The event writer of ranks other than 0: rank 0 alone writes (``EventWriter``'s API)."""

    def write(self, *args: Any, **kwargs: Any) -> None:
        pass

    write_summary = write_session_start = close = write


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


# ---------------------------------------------------------------------------------------
# Placements
# ---------------------------------------------------------------------------------------


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (without importing it eagerly)."""
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local") and hasattr(t, "placements")


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds: a DTensor's local shard, a plain tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def placement(t: torch.Tensor, world: int) -> tuple[str, str]:
    """``(kind, reason)``: how ``t`` is laid out over a job of ``world`` ranks.

    ``rows``: a DTensor ``Shard(0)`` on a one-dimensional mesh of all ``world`` ranks, with
    ``torch.chunk``'s row split (what ``fully_shard`` makes, uneven shards and ranks with no
    row included); ``sharded``: ``Shard(d)``, d > 0, on such a mesh (every entry on one
    rank: norms are exact, spectral metrics are not supported); ``replicated``: a plain
    tensor or a ``Replicate()`` DTensor; otherwise ``unsupported`` with the reason.
    """
    if not is_dtensor(t):
        return REPLICATED, ""
    mesh, places = t.device_mesh, tuple(t.placements)
    names = ", ".join(type(p).__name__ + (f"({p.dim})" if hasattr(p, "dim") else "") for p in places)
    if mesh.ndim != 1 or mesh.size() != world:
        return UNSUPPORTED, (f"DTensor on a {mesh.ndim}-D mesh of {mesh.size()} ranks in a job of "
                             f"{world} (HSDP / 2-D parallelism is not supported; the monitor "
                             "supports FSDP2 on one mesh over all ranks, and DDP)")
    p = places[0]
    if p.is_replicate():
        return REPLICATED, ""
    if p.is_shard() and getattr(p, "dim", None) == 0:
        rows = chunk_rows(t.shape[0], world, mesh.get_local_rank())
        if local(t).shape[0] == rows:
            return ROWS, ""
        return UNSUPPORTED, (f"Shard(0) DTensor whose local rows ({local(t).shape[0]}) are not "
                             f"torch.chunk's ({rows})")
    if p.is_shard():
        return SHARDED, (f"spectral metrics of a tensor sharded on a dimension other than 0 "
                         f"(DTensor placement [{names}], tensor parallel) are not supported; "
                         "norms are exact")
    return UNSUPPORTED, f"DTensor placement [{names}] is not supported"


def chunk_rows(n: int, world: int, rank: int) -> int:
    """Rows of an ``n``-row tensor that ``rank`` holds under ``torch.chunk``'s split
    (``ceil(n / world)`` per rank, the last ones fewer or none): FSDP2's ``Shard(0)``."""
    size = -(-n // world)
    return max(0, min(size, n - rank * size))


# ---------------------------------------------------------------------------------------
# The monitor's collectives
# ---------------------------------------------------------------------------------------


class CommError(RuntimeError):
    """A collective of the monitor failed or timed out (a rank died or stopped stepping)."""


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Rank owning each item: greedy longest-processing-time split of ``costs`` over
    ``world`` ranks (each item to the least loaded rank, largest first; ties by rank, so
    every rank computes the same assignment). Max load <= 4/3 of the optimum."""
    owners = [0] * len(costs)
    loads = [(0.0, r) for r in range(world)]
    heapq.heapify(loads)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(loads)
        owners[i] = r
        heapq.heappush(loads, (load + float(costs[i]), r))
    return owners


class Comm:
    """The monitor's process group: every collective it runs, with a timeout.

    All ranks must call the same collectives in the same order; the monitor guarantees this
    by deciding everything from values that are identical on every rank (the step, results
    of earlier all-reduces, rank 0's broadcasts). When one fails (a rank died, or stopped
    calling ``optimizer.step()``) it raises :class:`CommError` naming the timeout, and
    :attr:`broken` turns the monitor's collectives off on this rank for the rest of the job.

    The group is gloo whatever the job's backend: a gloo collective that times out raises
    (the monitor records it and training goes on), where NCCL's watchdog would tear the
    process down; the monitor's tensors go through host memory (bytes per logged step in
    the README's cost model).

    Args:
        timeout_s: seconds a collective of the monitor may wait for the other ranks.
        group: an existing process group (default: a new gloo group over all ranks, so the
            monitor's collectives and timeout are its own, never matched with the job's).
    """

    def __init__(self, timeout_s: float = 300.0, group: Any = None) -> None:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("monitor: torch.distributed is not initialised; call "
                               "torch.distributed.init_process_group() before watch()")
        self.timeout_s = float(timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.group = group if group is not None else _new_gloo_group(self.timeout_s)
        self.device = _collective_device(self.group)
        self.broken: str | None = None  # why the collectives are off, once one failed
        self.bytes = 0  # payload bytes this rank sent or received in the monitor's collectives
        self.calls = 0  # collectives run

    def stop(self, reason: str) -> None:
        """Turn the collectives off on this rank (it can no longer keep in step with the
        others: they time out after ``timeout_s`` and stop too, never hang)."""
        if not self.broken:
            self.broken = (f"{reason}; the monitor's collectives are off on this rank from "
                           f"now on (the other ranks' time out after {self.timeout_s:g} s), "
                           "training goes on")
            log.error("monitor: %s", self.broken)

    @contextlib.contextmanager
    def in_step(self, what: str):
        """Run a block of local work and collectives: an error that is not a collective's
        own leaves this rank out of step with the others, so it stops the collectives
        (:meth:`stop`) and is raised as :class:`CommError`."""
        try:
            yield
        except CommError:
            raise
        except Exception as err:
            self.stop(f"the monitor's {what} failed on rank {self.rank}: {err!r}")
            raise CommError(self.broken) from err

    def _run(self, what: str, fn, *args: Any, **kwargs: Any) -> Any:
        if self.broken:
            raise CommError(self.broken)
        try:
            self.calls += 1
            return fn(*args, group=self.group, **kwargs)
        except Exception as err:
            self.broken = (f"the monitor's collective {what} failed on rank {self.rank} "
                           f"(timeout {self.timeout_s:g} s; a rank died or stopped calling "
                           f"optimizer.step()?): {err}; the monitor's collectives are off on "
                           "this rank from now on, training goes on")
            log.error("monitor: %s", self.broken)
            raise CommError(self.broken) from err

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks (in place on a copy on the group's device); returns it."""
        buf = t.to(self.device)
        self.bytes += buf.numel() * buf.element_size()
        self._run("all_reduce", torch.distributed.all_reduce, buf)
        return buf.to(t.device)

    def broadcast_tensor(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``t`` into ``t`` on every rank (``t`` on the group's device)."""
        self.bytes += t.numel() * t.element_size()
        self._run("broadcast", torch.distributed.broadcast, t, src=src)
        return t

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (pickled)."""
        box = [obj]
        self.bytes += _pickled_size(obj) if self.rank == src else 0
        self._run("broadcast", torch.distributed.broadcast_object_list, box, src=src,
                  device=self.device)
        self.bytes += _pickled_size(box[0]) if self.rank != src else 0
        return box[0]

    def gather_objects(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's ``obj`` on rank ``dst`` (a list by rank), None elsewhere."""
        out = [None] * self.world if self.rank == dst else None
        self._run("gather", torch.distributed.gather_object, obj, out, dst=dst)
        self.bytes += sum(map(_pickled_size, out)) if out is not None else _pickled_size(obj)
        return out

    def gather_flat(self, t: torch.Tensor, lengths: Sequence[int], dst: int) -> list[torch.Tensor] | None:
        """Rank ``dst`` gets every rank's 1-D ``t`` (``lengths[r]`` values on rank r; padded
        to the longest for the gather), as a list by rank; None elsewhere."""
        buf = torch.zeros(max(lengths), dtype=t.dtype, device=self.device)
        buf[: t.numel()] = t.reshape(-1).to(self.device)
        out = [torch.empty_like(buf) for _ in range(self.world)] if self.rank == dst else None
        self.bytes += buf.numel() * buf.element_size() * (self.world if out is not None else 1)
        self._run("gather", torch.distributed.gather, buf, out, dst=dst)
        return None if out is None else [o[:n] for o, n in zip(out, lengths)]

    def scatter_flat(self, parts: Sequence[torch.Tensor] | None, lengths: Sequence[int],
                     dtype: torch.dtype, src: int) -> torch.Tensor:
        """Inverse of :meth:`gather_flat`: rank ``src`` holds ``parts`` (one 1-D tensor per
        rank); every rank gets its own (``lengths[rank]`` values)."""
        pad = max(lengths)
        buf = torch.empty(pad, dtype=dtype, device=self.device)
        padded = None
        if parts is not None:
            padded = []
            for part in parts:
                piece = torch.zeros(pad, dtype=dtype, device=self.device)
                piece[: part.numel()] = part.reshape(-1).to(device=self.device, dtype=dtype)
                padded.append(piece)
        self.bytes += pad * buf.element_size() * (self.world if padded is not None else 1)
        self._run("scatter", torch.distributed.scatter, buf, padded, src=src)
        return buf[: lengths[self.rank]]


def _new_gloo_group(timeout_s: float) -> Any:
    """A gloo group over all ranks (every rank must call this: ``watch()`` on every rank)."""
    try:
        return torch.distributed.new_group(backend="gloo",
                                           timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as err:
        raise RuntimeError(
            f"monitor: could not create the monitor's process group within {timeout_s:g} s "
            f"({err}): call monitor.watch() on every rank (each computes a share of the "
            "metrics of the whole tensors), after init_process_group and after wrapping the "
            "model") from err


def _pickled_size(obj: Any) -> int:
    """Bytes an object collective carries for ``obj`` (its pickle)."""
    return len(pickle.dumps(obj))


def _collective_device(group: Any) -> torch.device:
    """Where the group's collectives want their tensors: CUDA for NCCL, else host memory."""
    backend = str(torch.distributed.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
