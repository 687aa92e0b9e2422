"""LARS, LAMB and TVLARS: optimizers with a per-tensor trust ratio (SPEC 4).

Each optimizer stores the trust ratio it applied to a tensor in ``state[p]["trust_ratio"]``
(a Python float; 1.0 for excluded tensors), so the monitor's ``lr/<name>`` tag is the rate
the tensor really received, ``group lr x trust ratio`` (see ``monitor.hook.applied_lr``).

Exclusion ("bias/norm exclusion"). A tensor is *excluded* when its group says
``exclude=True``, or, with the default ``exclude=None``, when ``p.ndim <= 1`` (biases and
norm gains). Excluded tensors take a plain (momentum / Adam) step with no trust ratio and no
weight decay, as in the common LARS and LAMB implementations. ``exclude=False`` adapts all.

- **LARS** (You, Gitman, Ginsburg 2017, Algorithm 1)::

      d = g + wd * w
      r = eta * ||w|| / ||d||            (1 when ||w|| = 0 or ||d|| = 0)
      v = mu * v + lr * r * d
      w = w - v

  The learning rate sits inside the momentum buffer, as in the paper; with a constant lr
  this equals the ``v = mu v + r d; w -= lr v`` form of many implementations.

- **LAMB** (You et al. 2019, Algorithm 2), trust function phi = identity::

      m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
      u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * w
      r = ||w|| / ||u||                  (1 when either is 0)
      w = w - lr * r * u

- **TVLARS** (Do et al., arXiv 2309.14053): LARS with the trust ratio multiplied by::

      phi_t = 1 / (alpha + exp(lam * (t - delay))) + gamma_min

  where ``t`` is one global step counter per param group, 1 on the first ``step()`` (as in
  the authors' code: ``exp(lmbda * (step_cnt + 1))`` with ``step_cnt`` from 0; it is kept
  in ``group["step"]`` so it survives ``state_dict()``). The schedule starts on a high
  plateau (about ``1/alpha + gamma_min``: no warm-up) and decays to ``gamma_min`` around
  ``delay`` steps, at a rate set by ``lam``. The stored trust ratio includes phi_t.

  Defaults give that shape: ``delay`` (d_e, in steps) must be given, since only the run
  knows its length; ``lam`` defaults to ``10 / delay`` (phi_1 = 1/(alpha + e^-10), the
  plateau); ``gamma_min`` defaults to 0.001, the paper's ``0.001 * B / B_base`` at
  ``B = B_base``: pass ``0.001 * B / B_base`` for another batch size. A ``lam * delay`` too
  small to give a plateau (phi_1 below 90% of it) is warned about.

  *The authors' code differs from the paper* (repository KhoiDOO/tvlars, ``opt/tvlars.py``):
  alpha is fixed at 0.1, there is no gamma_min and no delay in the factor (their "delay"
  instead switches from plain LARS to the decaying factor after some epochs), the weight and
  update norms are clamped at 10, and the lr multiplies the momentum buffer from outside.
  Their warm-up LARS baseline (``scheduler/lars_warmup.py``) also scales its lr by
  ``B / 256`` while TVLARS gets the plain lr.
  We follow the paper's formula, with all four constants exposed and no clamping.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LARS", "LAMB", "TVLARS", "tvlars_factor", "warmup_cosine", "warmup_cosine_factor"]


def tvlars_factor(t: float, alpha: float, lam: float, delay: float, gamma_min: float) -> float:
    """TVLARS's time-varying factor ``phi_t = 1 / (alpha + exp(lam (t - delay))) + gamma_min``
    (``t`` = 1 on the first step)."""
    psi = lam * (t - delay)
    if psi > 700.0:  # exp overflows; the factor has reached gamma_min
        return gamma_min
    return 1.0 / (alpha + math.exp(psi)) + gamma_min


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int,
                         final_factor: float = 0.0) -> float:
    """LARS's usual schedule as a factor of the base lr: linear warm-up over
    ``warmup_steps`` (``(step + 1) / warmup_steps``), then a cosine decay from 1 to
    ``final_factor`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int,
                  final_factor: float = 0.0) -> LambdaLR:
    """A ``LambdaLR`` with :func:`warmup_cosine_factor`; call ``sched.step()`` once per
    optimizer step. ``warmup_steps=0`` gives a plain cosine decay."""
    if warmup_steps < 0 or total_steps <= 0 or warmup_steps > total_steps:
        raise ValueError(f"warmup_cosine: need 0 <= warmup_steps ({warmup_steps}) <= "
                         f"total_steps ({total_steps}) and total_steps > 0")
    return LambdaLR(optimizer, lambda s: warmup_cosine_factor(s, warmup_steps, total_steps,
                                                              final_factor))


def _check(name: str, value: float, low: float = 0.0, high: float | None = None) -> None:
    if not (value >= low and (high is None or value < high)):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"invalid {name}={value!r}: must be {bound}")


def _lars_defaults(lr: float, momentum: float, weight_decay: float, eta: float,
                   exclude: bool | None) -> dict[str, Any]:
    _check("lr", lr)
    _check("momentum", momentum, 0.0, 1.0)
    _check("weight_decay", weight_decay)
    _check("eta", eta)
    return dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, exclude=exclude)


def _excluded(group: dict[str, Any], p: torch.Tensor) -> bool:
    flag = group.get("exclude")
    return p.ndim <= 1 if flag is None else bool(flag)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor, coeff: float = 1.0) -> float:
    """``coeff * numerator / denominator``, or 1.0 when either norm is 0 (or not finite)."""
    w, d = float(numerator), float(denominator)
    if w > 0 and d > 0 and math.isfinite(w) and math.isfinite(d):
        return coeff * w / d
    return 1.0


def _call_closure(closure: Any) -> Any:
    """``step(closure)``: re-evaluate the loss with gradients enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _with_grads(optimizer: Optimizer, group: dict[str, Any]):
    """``(p, state, g, w)`` for each tensor of ``group`` with a gradient: ``g`` the gradient
    and ``w`` the weight, both in float32 for half-precision tensors."""
    for p in group["params"]:
        if p.grad is None:
            continue
        g = p.grad.float() if p.dtype in (torch.float16, torch.bfloat16) else p.grad
        yield p, optimizer.state[p], g, p.detach().to(g.dtype)


class LARS(Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017). See the module docstring.

    Args:
        lr: global learning rate (LARS typically uses large values with ``eta=1e-3``).
        momentum: mu. weight_decay: wd (not applied to excluded tensors).
        eta: trust coefficient. exclude: ``None`` (ndim <= 1 excluded), True or False;
            can be set per param group.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1.0, momentum: float = 0.9,
                 weight_decay: float = 0.0, eta: float = 1e-3, exclude: bool | None = None
                 ) -> None:
        super().__init__(params, _lars_defaults(lr, momentum, weight_decay, eta, exclude))

    def _factor(self, group: dict[str, Any]) -> float:
        """Extra multiplier of the trust ratio on this step (1 for LARS)."""
        return 1.0

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = _call_closure(closure)
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            group["step"] = group.get("step", 0) + 1  # global counter, 1 on the first step
            factor = self._factor(group)
            for p, state, g, w in _with_grads(self, group):
                t = state.get("step", 0)
                if _excluded(group, p):
                    d, ratio = g, 1.0
                else:
                    d = g.add(w, alpha=wd) if wd else g
                    ratio = _ratio(w.norm(), d.norm(), group["eta"]) * factor
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.zeros_like(d)
                buf.mul_(mu).add_(d, alpha=lr * ratio)
                p.sub_(buf.to(p.dtype))
                state["trust_ratio"] = ratio
                state["step"] = t + 1
        return loss


class TVLARS(LARS):
    """Time-varying LARS (Do et al., arXiv 2309.14053): LARS whose trust ratio is multiplied
    by :func:`tvlars_factor` (``alpha``, ``lam``, ``delay`` in steps, ``gamma_min``), used
    without warm-up. Excluded tensors (biases, norms) keep a plain momentum step (ratio 1).
    The paper's formula is followed, not the authors' code; see the module docstring.

    ``delay`` is required (the plateau's length in steps); ``lam=None`` means
    ``10 / delay``; ``gamma_min`` is the paper's ``0.001 * B / B_base`` (default 0.001)."""

    def __init__(self, params: Iterable[Any], lr: float = 1.0, momentum: float = 0.9,
                 weight_decay: float = 0.0, eta: float = 1e-3, *, delay: float,
                 lam: float | None = None, alpha: float = 1.0, gamma_min: float = 1e-3,
                 exclude: bool | None = None) -> None:
        if not alpha > 0:
            raise ValueError(f"invalid alpha={alpha!r}: must be > 0 (the plateau is 1/alpha)")
        _check("delay", delay)
        if lam is None:
            if not delay > 0:
                raise ValueError("invalid delay=0 with lam=None: lam defaults to 10 / delay; "
                                 "give delay > 0 (steps of the plateau) or an explicit lam")
            lam = 10.0 / delay
        _check("lam", lam)
        _check("gamma_min", gamma_min)
        plateau, start = 1.0 / alpha + gamma_min, tvlars_factor(1, alpha, lam, delay, gamma_min)
        if start < 0.9 * plateau:
            warnings.warn(f"TVLARS(lam={lam:g}, delay={delay:g}): phi starts at {start:.3g}, "
                          f"below 90% of its plateau {plateau:.3g}, so there is no high "
                          "plateau; the paper's schedule needs lam * delay >= about 3",
                          stacklevel=2)
        defaults = _lars_defaults(lr, momentum, weight_decay, eta, exclude)
        defaults.update(alpha=alpha, lam=lam, delay=delay, gamma_min=gamma_min)
        Optimizer.__init__(self, params, defaults)

    def _factor(self, group: dict[str, Any]) -> float:
        return tvlars_factor(group["step"], group["alpha"], group["lam"], group["delay"],
                             group["gamma_min"])


class LAMB(Optimizer):
    """Layer-wise Adaptive Moments for Batch training (You et al. 2019), with bias
    correction and the identity trust function. See the module docstring."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, exclude: bool | None = None) -> None:
        _check("lr", lr)
        _check("betas[0]", betas[0], 0.0, 1.0)
        _check("betas[1]", betas[1], 0.0, 1.0)
        if not eps > 0:
            raise ValueError(f"invalid eps={eps!r}: must be > 0")
        _check("weight_decay", weight_decay)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      exclude=exclude))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = _call_closure(closure)
        for group in self.param_groups:
            (b1, b2), eps, wd, lr = group["betas"], group["eps"], group["weight_decay"], group["lr"]
            for p, state, g, w in _with_grads(self, group):
                if "exp_avg" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(g)
                    state["exp_avg_sq"] = torch.zeros_like(g)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                u = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
                if _excluded(group, p):
                    ratio = 1.0
                else:
                    if wd:
                        u = u.add(w, alpha=wd)
                    ratio = _ratio(w.norm(), u.norm())
                p.sub_((u * (lr * ratio)).to(p.dtype))
                state["trust_ratio"] = ratio
        return loss
