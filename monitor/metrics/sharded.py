"""Metrics of tensors spread over ranks (SPEC section 7): the whole tensor's value, never a shard's.

A tensor is either ``replicated`` (every rank holds all of it: DDP) or sharded by ``rows``
(FSDP2's ``Shard(0)``: rank r holds rows ``[r·c, r·c + rows_r)`` with ``c = ceil(d0 / world)``),
see :func:`monitor.distributed.placement`. With ``M_r`` rank r's rows of the matrix view
``M (d0 × rest)``:

- norms: ``‖M‖_F² = Σ_r ‖M_r‖_F²``; every tensor of a step is reduced in ONE all-reduce of
  a float64 vector of local squared sums (a replicated tensor is counted by its owner rank
  only), with the non-finite counts in the same vector (:func:`reduce_sums`);
- σ1 by power iteration on the shards (:func:`power_sigma_rows`): ``u_r = M_r v`` is local,
  ``MᵀM v = Σ_r M_rᵀ u_r`` and ``‖M v‖² = Σ_r ‖u_r‖²`` come from one all-reduce of
  ``rest + 1`` values per layer and iteration, and all layers iterate together, so a step
  costs at most ``max_iters`` all-reduces whatever the number of layers; it stops on a
  residual that bounds the error (SPEC 6);
- everything else of a sharded layer (SJE's top-k subspace, PSS) gathers the whole tensor on
  the rank that owns the layer (:func:`gather_whole`), on the steps that need it only.

σ1, SR, SJE and PSS are invariant under transposition, so the row view of HF Conv1D weights
(stored ``(in, out)``, sharded on ``in``) gives the same values as its ``(out, in)`` view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from monitor.distributed import Comm, chunk_rows
from monitor.metrics import norms


def local_sq_sums(tensors: Sequence[torch.Tensor | None]) -> tuple[list[float], int]:
    """``([‖T‖_F² for T in tensors], non-finite entries over them)`` of local tensors.

    ``None`` entries (not this rank's to count) give 0. Fused norms as ``norms`` computes
    them (float64 tensors in float64, sparse ones through their values); only tensors whose
    norm is not finite are counted entry by entry (as ``norms.nonfinite_count``).
    """
    idx = [i for i, t in enumerate(tensors) if t is not None and t.numel() > 0]
    sq = [0.0] * len(tensors)
    if not idx:
        return sq, 0
    host = norms._to_floats(norms._norm_tensors([tensors[i] for i in idx]))
    count = 0
    for i, n in zip(idx, host):
        sq[i] = n * n
        if not math.isfinite(n):
            count += int((~torch.isfinite(norms.dense_values(tensors[i]))).sum().item())
    return sq, count


def reduce_sums(values: Sequence[float], comm: Comm | None) -> list[float]:
    """``values`` summed over ranks in one float64 all-reduce (as is without ``comm``)."""
    if comm is None or not values:
        return list(values)
    return comm.all_reduce(torch.tensor(list(values), dtype=torch.float64)).tolist()


@dataclass
class ShardedPower:
    """Result of :func:`power_sigma_rows` for one layer (as ``spectral.PowerResult``)."""

    sigma: float
    v: torch.Tensor  # (n,) right singular vector, the same on every rank: the next warm start
    iters: int
    converged: bool  # residual <= tol
    residual: float = math.nan  # ‖Mᵀu - α v‖ / α: bounds the relative error of sigma


def power_sigma_rows(blocks: Sequence[torch.Tensor], v0s: Sequence[torch.Tensor | None],
                     fro2: Sequence[float], comm: Comm, *, max_iters: int = 30,
                     tol: float = 1e-4) -> list[ShardedPower]:
    """σ1 of each row-sharded matrix by power iteration on the shards, all layers together.

    ``blocks[l]`` is this rank's rows ``M_r`` (possibly none) of layer l's matrix, ``v0s[l]``
    its warm start, ``fro2[l]`` its global ``‖M‖_F²`` (to tell a zero matrix from a warm
    start in the null space). Every rank must pass the same layers in the same order.

    Iteration (per layer, unit ``v``): ``u_r = M_r v``, ``w' = Σ_r M_rᵀ u_r``,
    ``α² = Σ_r ‖u_r‖²`` (one all-reduce for all active layers); ``w = w' / α = Mᵀu`` with
    ``u = M v / α``; the relative residual ``‖w - α v‖ / α`` of the pair (u, v) bounds the
    distance of α to a singular value (SPEC 6); stop when it is at most ``tol``. σ = ‖w‖,
    a lower bound of σ1 at least α; ``v = w / ‖w‖``. σ is 0.0 for a zero matrix and nan
    for non-finite entries; ``converged`` is False after ``max_iters`` (the caller records
    the failure). Power iteration needs about ``log(tol) / (2 log(σ2/σ1))`` iterations:
    many on the flat spectra of freshly initialised matrices, where gathering the matrix
    on its owner (Lanczos there) is the better choice.
    """
    mats = [b.detach().to(torch.float32) for b in blocks]
    vs = [_unit_start(v0, m.shape[1], m.device) for v0, m in zip(v0s, mats)]
    warm = [v0 is not None for v0 in v0s]
    out: list[ShardedPower | None] = [None] * len(mats)
    last = [ShardedPower(math.nan, v, 0, False) for v in vs]
    active = list(range(len(mats)))
    for it in range(1, max_iters + 1):
        if not active:
            break
        ws, ss = [], []
        for l in active:
            u = mats[l] @ vs[l]
            ss.append(u.pow(2).sum())
            ws.append(mats[l].t() @ u)
        flat = comm.all_reduce(torch.cat([*ws, torch.stack(ss)]))  # float32: (n + 1) per layer
        sizes = [w.numel() for w in ws]
        parts = list(torch.split(flat[: sum(sizes)], sizes))
        s_all = flat[sum(sizes):].double().tolist()
        still = []
        for l, w, s in zip(active, parts, s_all):
            alpha = math.sqrt(s) if s > 0 else 0.0
            w = w / alpha if alpha > 0 else w
            wn = float(torch.linalg.vector_norm(w))
            if not (math.isfinite(wn) and alpha > 0 and wn > 0):
                if s == 0 and warm[l] and fro2[l] > 0:  # warm start in the null space: restart
                    warm[l] = False
                    vs[l] = _unit_start(None, mats[l].shape[1], mats[l].device)
                    still.append(l)
                    continue
                zero = s == 0 and fro2[l] == 0
                out[l] = ShardedPower(0.0 if zero else math.nan, vs[l], it, False)
                continue
            residual = float(torch.linalg.vector_norm(w - alpha * vs[l])) / alpha
            vs[l] = (w / wn).to(torch.float32)
            last[l] = ShardedPower(wn, vs[l], it, residual <= tol, residual)
            if residual <= tol:
                out[l] = last[l]
                continue
            still.append(l)
        active = still
    for l in active:
        out[l] = last[l]
    return out  # type: ignore[return-value]


def _unit_start(v0: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """``v0`` normalised, or a fixed-seed random unit vector when it is unusable."""
    if v0 is not None and v0.shape == (n,):
        v = v0.detach().to(device=device, dtype=torch.float32)
        norm = float(torch.linalg.vector_norm(v))
        if math.isfinite(norm) and norm > 0:
            return v / norm
    v = torch.randn(n, device=device, generator=torch.Generator(device=device).manual_seed(0))
    return v / torch.linalg.vector_norm(v)


def gather_whole(shards: Sequence[torch.Tensor], shapes: Sequence[torch.Size], comm: Comm,
                 dst: int) -> list[torch.Tensor] | None:
    """The whole tensors of row-sharded ``shards`` (this rank's local rows; global
    ``shapes``) on rank ``dst``, in one gather for all of them; None on other ranks.

    Bytes: every tensor once (plus the padding of uneven shards), float32.
    """
    world = comm.world
    rows = [[chunk_rows(s[0], world, r) for r in range(world)] for s in shapes]
    width = [math.prod(s[1:]) for s in shapes]
    lengths = [sum(rows[l][r] * width[l] for l in range(len(shapes))) for r in range(world)]
    mine = [s.detach().reshape(-1).to(torch.float32) for s in shards]
    flat = torch.cat(mine) if mine else torch.zeros(0)
    parts = comm.gather_flat(flat, lengths, dst)
    if parts is None:
        return None
    out = []
    offsets = [0] * world
    for l, shape in enumerate(shapes):
        pieces = []
        for r in range(world):
            n = rows[l][r] * width[l]
            pieces.append(parts[r][offsets[r]: offsets[r] + n])
            offsets[r] += n
        out.append(torch.cat(pieces).reshape(shape))
    return out


def scatter_whole(wholes: Sequence[torch.Tensor] | None, shapes: Sequence[torch.Size],
                  comm: Comm, src: int) -> list[torch.Tensor]:
    """Inverse of :func:`gather_whole`: rank ``src`` holds the whole tensors; every rank gets
    its rows of each (float32, in its local shape)."""
    world = comm.world
    rows = [[chunk_rows(s[0], world, r) for r in range(world)] for s in shapes]
    width = [math.prod(s[1:]) for s in shapes]
    lengths = [sum(rows[l][r] * width[l] for l in range(len(shapes))) for r in range(world)]
    parts = None
    if wholes is not None:
        parts = []
        for r in range(world):
            pieces = []
            for l, whole in enumerate(wholes):
                start = sum(rows[l][:r])
                pieces.append(whole.reshape(shapes[l][0], -1)[start: start + rows[l][r]]
                              .reshape(-1).to(torch.float32))
            parts.append(torch.cat(pieces) if pieces else torch.zeros(0))
    flat = comm.scatter_flat(parts, lengths, torch.float32, src)
    out, offset = [], 0
    for l, shape in enumerate(shapes):
        n = rows[l][comm.rank] * width[l]
        out.append(flat[offset: offset + n].reshape(rows[l][comm.rank], *shape[1:]))
        offset += n
    return out
