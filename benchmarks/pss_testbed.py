"""The testbed of the PSS comparison (``benchmarks/pss_lr_sweep.py``).

The GPT of ``benchmarks/spike_model.py`` (post-LN here: ``Setup``), a character model
trained with AdamW(0.9, 0.95), weight decay 0.1, linear warm-up then cosine decay, on the
Python standard library's source (held-out validation split), sized so that one 400-step
run takes about 15 s on one CPU thread. ``train(RunSpec)`` runs one arm (an intervention
against loss spikes), optionally with an injected fault (``FAULTS``), and returns a
``RunResult`` with per-step training loss and pre-clip gradient norm, the validation
loss, and what PSS did. A run fails when it explodes (``explosion_step``: issue 11's rule)
or stalls at the unigram plateau (``failed``), the way post-LN fails at too large an LR.

Arms (``ARMS``):

- ``none``; ``clip`` (``clip_grad_norm_(1.0)``);
- ``zclip``: ZClip (Kumar et al., arXiv 2504.02507), z-score adaptive clipping, ported
  from bluorion-com/ZClip ``zclip/zclip.py`` (mode ``zscore``, ``adaptive_scaling``,
  its defaults alpha 0.97, z_thresh 2.5, warm-up 25, max_grad_norm 1.0);
- ``adagc``: AdaGC (arXiv 2502.11034), per-tensor adaptive clipping inside Adam, the
  maintained ``pytorch_optimizer.AdaGC`` (its defaults, our betas and weight decay);
- ``spam``: SPAM (arXiv 2501.06842), spike-aware Adam with momentum reset, the
  maintained ``pytorch_optimizer.SPAM`` (its defaults, our betas and weight decay);
- ``msign``: MSign-style periodic orthogonalisation (arXiv 2602.01734): every
  ``MSIGN_EVERY`` steps each block matrix becomes ``||W||_F / sqrt(r) · U Vᵀ`` (its polar
  factor, Frobenius norm kept); our reading, the paper's exact schedule is not public here;
- ``pss``: ``PSSConfig()`` through ``PSSController``; ``pss_alt``: a second PSS setting;
- ``qkln``: LayerNorm on queries and keys (Dehghani et al. 2302.05442, Wortsman et al.
  2309.14322), the positive control;
- ``random``: PSS smoothing (the ``pss`` settings) at ``n_random`` random steps after the
  detection warm-up: separates "smoothing helps" from "detection helps".

Only torch and this repository are needed, except ``adagc`` and ``spam``
(``pip install stability-monitor[bench]``).
"""

from __future__ import annotations

import functools
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.spike_model import SpikeGPT, SpikeGPTConfig  # noqa: E402
from demos.data import encode, stdlib_text  # noqa: E402
from monitor.pss.controller import PSSController, PSSStepResult  # noqa: E402
from monitor.schema import PSSConfig  # noqa: E402

ARMS = ("none", "clip", "zclip", "adagc", "spam", "msign", "pss", "pss_alt", "qkln", "random")
MSIGN_EVERY = 100
EXPLODE_NATS, EXPLODE_STEPS = 1.0, 20  # explosion: loss > running min + 1 nat for >= 20 steps
# stalled: the 50-step mean training loss >= the unigram loss - 0.1 nat for >= 100 steps
STALL_WINDOW, STALL_MARGIN, STALL_STEPS = 50, 0.1, 100


@dataclass(frozen=True)
class Setup:
    """The testbed (phase 0 of the sweep chose it: post-LN fails at 2x its optimal LR)."""

    n_layer: int = 4
    n_head: int = 2
    n_embd: int = 64
    block_size: int = 32
    batch_size: int = 16
    steps: int = 400
    warmup: int = 40
    stop_after: int = 200  # stop a run that stayed exploded this many steps (a collapse)
    min_lr_frac: float = 0.1  # cosine decays to this fraction of the peak
    weight_decay: float = 0.1
    val_batches: int = 16
    post_ln: bool = True  # post-LN blocks (spike_model.py)
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass(frozen=True)
class RunSpec:
    arm: str
    lr: float
    seed: int
    setup: Setup = Setup()
    pss: PSSConfig | None = None  # the pss / pss_alt / random settings
    n_random: int = 0  # random arm: how many interventions
    fault_step: int | None = None  # inject a fault of ``fault_kind`` at this step
    fault_scale: float = 0.0
    fault_kind: str = "rank_one"  # one of FAULTS


@dataclass
class RunResult:
    spec: RunSpec
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)  # pre-clip global norm
    val_loss: float = math.inf
    fired: list[int] = field(default_factory=list)
    k_values: list[int] = field(default_factory=list)
    dw_ratio: list[float] = field(default_factory=list)  # ||dW||_F / ||W||_F per smoothed tensor
    sr_before: list[float] = field(default_factory=list)
    sr_after: list[float] = field(default_factory=list)
    sr_min: list[float] = field(default_factory=list)  # least SR over block matrices, every 25 steps
    step_seconds: float = 0.0  # median wall time of a step without intervention
    intervention_seconds: list[float] = field(default_factory=list)

    def explosion_step(self) -> int | None:
        return explosion_step(self.losses)


def explosion_step(losses: list[float]) -> int | None:
    """First step of the first explosion: the training loss non-finite, or above its running
    minimum + 1 nat (``EXPLODE_NATS``) for >= 20 consecutive steps (``EXPLODE_STEPS``)."""
    best, above = math.inf, 0
    for t, loss in enumerate(losses):
        if not math.isfinite(loss):
            return t - above
        best = min(best, loss)
        above = above + 1 if loss > best + EXPLODE_NATS else 0
        if above >= EXPLODE_STEPS:
            return t - above + 1
    return None


# ---------------------------------------------------------------------------- model
def make_model(s: Setup, qk_norm: bool = False) -> SpikeGPT:
    """The testbed's GPT (``benchmarks/spike_model.py``) sized by ``s``."""
    return SpikeGPT(SpikeGPTConfig(vocab_size=128, block_size=s.block_size, n_layer=s.n_layer,
                                   n_head=s.n_head, n_embd=s.n_embd, qk_norm=qk_norm,
                                   post_ln=s.post_ln))


def block_matrices(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2]


# ---------------------------------------------------------------------------- data
_DATA: dict[str, torch.Tensor] = {}


def data(split: str) -> torch.Tensor:
    """90 % / 10 % train / validation split of the stdlib text (cached per process)."""
    if not _DATA:
        ids = encode(stdlib_text(1_000_000))
        cut = int(0.9 * len(ids))
        _DATA["train"], _DATA["val"] = ids[:cut], ids[cut:]
    return _DATA[split]


@functools.lru_cache(maxsize=None)
def unigram_loss(split: str = "train") -> float:
    """Cross-entropy of ``split`` under the training split's byte frequencies,
    ``-sum q log p``: the loss of a model that learned nothing but the unigram (the plateau a
    post-LN transformer stalls at when its LR is too large; 3.18 nats on train here)."""
    p = torch.bincount(data("train"), minlength=128).double()
    q = torch.bincount(data(split), minlength=128).double()
    p, q = p / p.sum(), q / q.sum()
    return float(-(q[p > 0] * p[p > 0].log()).sum())


def stall_steps(losses: list[float], plateau: float, start: int) -> int:
    """The longest stretch of steps ``t >= start`` whose trailing mean training loss over
    ``STALL_WINDOW`` steps is at or above ``plateau - STALL_MARGIN``: how long the run sat
    at (or above) the unigram plateau after the warm-up."""
    best = run = 0
    for t in range(start, len(losses)):
        window = losses[max(0, t - STALL_WINDOW + 1): t + 1]
        mean = sum(window) / len(window)
        run = run + 1 if not mean < plateau - STALL_MARGIN else 0  # NaN counts as stalled
        best = max(best, run)
    return best


def failed(losses: list[float], s: Setup, explosion: int | None = None) -> bool:
    """A failed run: it exploded (issue 11's rule, ``explosion_step``), or it stalled at the
    unigram plateau for >= ``STALL_STEPS`` steps after the warm-up (``stall_steps``, counted
    from ``warmup + STALL_WINDOW``)."""
    if explosion is not None:
        return True
    return stall_steps(losses, unigram_loss(), s.warmup + STALL_WINDOW) >= STALL_STEPS


def batch(split: str, s: Setup, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    windows = data(split).unfold(0, s.block_size + 1, 1)  # a view: (N, T + 1)
    rows = windows[torch.randint(len(windows), (s.batch_size,), generator=gen)]
    return rows[:, :-1], rows[:, 1:]


def lr_at(step: int, s: Setup, peak: float) -> float:
    if step < s.warmup:
        return peak * (step + 1) / s.warmup
    frac = (step - s.warmup) / max(1, s.steps - s.warmup)
    return peak * (s.min_lr_frac + (1 - s.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def validation_loss(model: nn.Module, s: Setup) -> float:
    gen = torch.Generator().manual_seed(12345)  # the same held-out batches for every run
    losses = [float(model(*batch("val", s, gen))[0]) for _ in range(s.val_batches)]
    return sum(losses) / len(losses)


# ---------------------------------------------------------------------------- interventions
class ZClip:
    """ZClip's z-score mode with adaptive scaling, after bluorion-com/ZClip (see module doc).

    Warm-up: the first ``warmup`` norms are collected (clipped at ``max_norm``) and
    initialise the mean and variance. Then with ``z = (g - μ) / (σ + eps)``: if
    ``z > z_thresh`` the threshold is ``μ + z_thresh σ / (z / z_thresh)``, else none; the
    gradients are scaled to ``min(threshold or g, max_norm)`` and the EMAs
    ``μ <- a μ + (1 - a) g'``, ``v <- a v + (1 - a) (g' - μ)²`` take the clipped value
    ``g'`` (the threshold when one was computed).
    """

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, max_norm: float | None = 1.0,
                 warmup: int = 25, eps: float = 1e-6) -> None:
        self.alpha, self.z, self.max_norm, self.warmup, self.eps = alpha, z_thresh, max_norm, warmup, eps
        self.buffer: list[float] = []
        self.mean: float | None = None
        self.var = 0.0

    def __call__(self, params: list[nn.Parameter], g: float) -> None:
        if self.mean is None:
            self.buffer.append(g)
            if len(self.buffer) >= self.warmup:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
            if self.max_norm is not None:
                _scale_to(params, g, self.max_norm)
            return
        std = self.var ** 0.5
        z = (g - self.mean) / (std + self.eps)
        threshold = self.mean + self.z * std / (z / self.z) if z > self.z else None
        target = threshold if threshold is not None else g
        if self.max_norm is not None:
            target = min(target, self.max_norm)
        _scale_to(params, g, target)
        new = threshold if threshold is not None else g
        self.mean = self.alpha * self.mean + (1 - self.alpha) * new
        self.var = self.alpha * self.var + (1 - self.alpha) * (new - self.mean) ** 2


def _scale_to(params: list[nn.Parameter], g: float, target: float) -> None:
    if g > target:
        coef = target / (g + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)


@torch.no_grad()
def msign_(model: nn.Module) -> None:
    """Every block matrix to its polar factor scaled to keep the Frobenius norm."""
    for _, p in block_matrices(model):
        U, _, Vh = torch.linalg.svd(p.float(), full_matrices=False)
        p.copy_(U @ Vh * (p.norm() / math.sqrt(min(p.shape))))


#: injected faults: ``rank_one`` (below); the spike testbed's mechanisms
#: (benchmarks/spike_testbed.py): ``lr_jump`` (LR x scale for 5 steps), ``bit_flip`` (one
#: entry of one block matrix x scale, as a flipped exponent bit does), ``weight_scale`` (one
#: attention qkv matrix x scale)
FAULTS = ("rank_one", "lr_jump", "bit_flip", "weight_scale")
LR_JUMP_STEPS = 5


@torch.no_grad()
def inject(model: SpikeGPT, kind: str, scale: float, gen: torch.Generator) -> None:
    """Corrupt the weights in place (every kind but ``lr_jump``, which ``lr_at`` applies)."""
    if kind == "rank_one":
        inject_fault(model, scale, gen)
        return
    block = model.blocks[int(torch.randint(len(model.blocks), (1,), generator=gen))]
    if kind == "weight_scale":
        block.attn.qkv.weight.mul_(scale)
    elif kind == "bit_flip":
        w = (block.fc.weight, block.attn.qkv.weight)[int(torch.randint(2, (1,), generator=gen))]
        w.view(-1)[int(torch.randint(w.numel(), (1,), generator=gen))] *= scale
    elif kind != "lr_jump":
        raise ValueError(f"unknown fault {kind!r}; choose from {FAULTS}")


@torch.no_grad()
def inject_fault(model: nn.Module, scale: float, gen: torch.Generator) -> None:
    """Add ``scale · ||W||_F · u vᵀ`` (unit random u, v) to every block matrix: an injected
    singularity (a direction that suddenly dominates the spectrum)."""
    for _, p in block_matrices(model):
        u = torch.randn(p.shape[0], generator=gen)
        v = torch.randn(p.shape[1], generator=gen)
        p.add_(scale * p.norm() * torch.outer(u / u.norm(), v / v.norm()))


def make_optimizer(arm: str, model: nn.Module, s: Setup, lr: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if arm == "adagc":
        from pytorch_optimizer import AdaGC
        return AdaGC(groups, lr=lr, betas=(0.9, s.beta2), eps=s.eps)
    if arm == "spam":
        from pytorch_optimizer import SPAM
        return SPAM(groups, lr=lr, betas=(0.9, s.beta2))
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, s.beta2), eps=s.eps, fused=True)


def _collapsed(out: RunResult, s: Setup) -> bool:
    """The loss stayed above its running minimum + 1 nat for ``s.stop_after`` steps."""
    tail = out.losses[-s.stop_after:]
    if len(tail) < s.stop_after or out.explosion_step() is None:
        return False
    best = min(out.losses[:-s.stop_after] or [math.inf])
    return min(tail) > best + EXPLODE_NATS


def _stable_rank(p: torch.Tensor) -> float:
    s = torch.linalg.matrix_norm(p.detach().float(), ord=2)
    return float(p.detach().float().pow(2).sum() / s ** 2) if s > 0 else math.nan


# ---------------------------------------------------------------------------- the run
def train(spec: RunSpec) -> RunResult:
    """One training run of ``spec.arm``; never raises on divergence (the loss goes inf)."""
    torch.set_num_threads(1)
    s = spec.setup
    torch.manual_seed(spec.seed)
    model = make_model(s, qk_norm=spec.arm == "qkln")
    opt = make_optimizer(spec.arm, model, s, spec.lr)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1000 + spec.seed)  # same data order in every arm
    fault_gen = torch.Generator().manual_seed(7 + spec.seed)
    out = RunResult(spec)
    zclip = ZClip() if spec.arm == "zclip" else None
    pss, logdir = _make_pss(spec, model, opt)
    random_steps = _random_steps(spec)
    step_times = []
    for t in range(s.steps):
        start = time.perf_counter()
        jump = (spec.fault_kind == "lr_jump" and spec.fault_step is not None
                and spec.fault_step <= t < spec.fault_step + LR_JUMP_STEPS)
        for group in opt.param_groups:
            group["lr"] = lr_at(t, s, spec.lr) * (spec.fault_scale if jump else 1.0)
        if spec.fault_step == t:
            inject(model, spec.fault_kind, spec.fault_scale, fault_gen)
        _, loss = model(*batch("train", s, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        g = float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None])))
        out.losses.append(float(loss.detach()))
        out.grad_norms.append(g)
        if not (math.isfinite(out.losses[-1]) and math.isfinite(g)) or _collapsed(out, s):
            break
        if spec.arm == "clip":
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        elif zclip is not None:
            zclip(params, g)
        acted = False
        if pss is not None:
            acted = _pss_step(pss, spec, t, g, t in random_steps, out, model)
        opt.step()
        if spec.arm == "msign" and (t + 1) % MSIGN_EVERY == 0:
            msign_(model)
        if t % 25 == 0:
            out.sr_min.append(min(_stable_rank(p) for _, p in block_matrices(model)))
        if not acted:
            step_times.append(time.perf_counter() - start)
    out.val_loss = validation_loss(model, s) if len(out.losses) == s.steps else math.inf
    if not math.isfinite(out.val_loss):
        out.val_loss = math.inf
    step_times.sort()
    out.step_seconds = step_times[len(step_times) // 2] if step_times else math.nan
    if logdir is not None:
        logdir.cleanup()
    return out


def _make_pss(spec: RunSpec, model: nn.Module, opt: torch.optim.Optimizer):
    if spec.arm not in ("pss", "pss_alt", "random"):
        return None, None
    cfg = spec.pss or PSSConfig()
    if spec.arm == "random":  # the same smoothing, never triggered by the detector
        cfg = PSSConfig(**{**cfg.to_dict(), "tau": 1e9})
    logdir = tempfile.TemporaryDirectory(prefix="pss_bench_")
    named = [(n, p) for n, p in model.named_parameters()]
    return PSSController(cfg, model, opt, logdir.name, named_params=named, check_every=10**9), logdir


def _random_steps(spec: RunSpec) -> set[int]:
    if spec.arm != "random" or spec.n_random <= 0:
        return set()
    warm = (spec.pss or PSSConfig()).warmup_steps
    rng = random.Random(10_000 + spec.seed)
    pool = list(range(warm, spec.setup.steps))
    return set(rng.sample(pool, min(spec.n_random, len(pool))))


def _pss_step(pss: PSSController, spec: RunSpec, t: int, g: float, force: bool,
              out: RunResult, model: nn.Module) -> bool:
    before = {n: p.detach().clone() for n, p in block_matrices(model)}
    start = time.perf_counter()
    if force:
        result = PSSStepResult()
        pss._intervene(t, "random trigger", pss.selected, result)  # the selected layers
    else:
        result = pss.before_step(t, g)
    if result.scalars.get("pss/intervention", 0.0) != 1.0:
        return False
    out.intervention_seconds.append(time.perf_counter() - start)
    out.fired.append(t)
    for name, p in block_matrices(model):
        tag = f"pss_k/{name}"
        if tag in result.scalars:
            out.k_values.append(int(result.scalars[tag]))
            out.sr_before.append(result.scalars[f"pss_sr_before/{name}"])
            out.sr_after.append(result.scalars[f"pss_sr_after/{name}"])
            w = before[name]
            out.dw_ratio.append(float((p.detach() - w).norm() / w.norm()))
    return True
