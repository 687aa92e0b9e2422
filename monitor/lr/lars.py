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

  where ``t`` counts optimizer steps from 0 (the first step has t = 0; counted per tensor,
  in ``state[p]["step"]``, so a tensor that had no gradient on some steps lags). It starts on a
  high plateau (about ``1/alpha + gamma_min``: no warm-up) and decays to ``gamma_min`` after
  ``delay`` steps at a rate set by ``lam``. The stored trust ratio includes phi_t.

  *The authors' code differs from the paper* (repository KhoiDOO/tvlars, ``opt/tvlars.py``):
  alpha is fixed at 0.1, there is no gamma_min and no delay in the factor (their "delay"
  instead switches from plain LARS to the decaying factor after some epochs), the weight and
  update norms are clamped at 10, and the lr multiplies the momentum buffer from outside.
  We follow the paper's formula, with all four constants exposed and no clamping.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LARS", "LAMB", "TVLARS", "tvlars_factor", "warmup_cosine", "warmup_cosine_factor"]


def tvlars_factor(t: float, alpha: float = 1.0, lam: float = 1e-3, delay: float = 0.0,
                  gamma_min: float = 0.0) -> float:
    """TVLARS's time-varying factor ``phi_t = 1 / (alpha + exp(lam (t - delay))) + gamma_min``."""
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

    def _factor(self, group: dict[str, Any], t: int) -> float:
        """Extra multiplier of the trust ratio at step ``t`` (1 for LARS)."""
        return 1.0

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = _call_closure(closure)
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p, state, g, w in _with_grads(self, group):
                t = state.get("step", 0)
                if _excluded(group, p):
                    d, ratio = g, 1.0
                else:
                    d = g.add(w, alpha=wd) if wd else g
                    ratio = _ratio(w.norm(), d.norm(), group["eta"]) * self._factor(group, t)
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

    The defaults (``alpha=1, lam=1e-3, delay=0, gamma_min=0``) start at phi_0 = 0.5; set
    ``delay`` and ``lam`` for the run's length, e.g. ``delay = total_steps / 2`` and
    ``lam = 10 / total_steps`` (what ``benchmarks/lr_papers.py`` uses)."""

    def __init__(self, params: Iterable[Any], lr: float = 1.0, momentum: float = 0.9,
                 weight_decay: float = 0.0, eta: float = 1e-3, alpha: float = 1.0,
                 lam: float = 1e-3, delay: float = 0.0, gamma_min: float = 0.0,
                 exclude: bool | None = None) -> None:
        if not alpha > 0:
            raise ValueError(f"invalid alpha={alpha!r}: must be > 0 (the plateau is 1/alpha)")
        _check("lam", lam)
        _check("delay", delay)
        _check("gamma_min", gamma_min)
        defaults = _lars_defaults(lr, momentum, weight_decay, eta, exclude)
        defaults.update(alpha=alpha, lam=lam, delay=delay, gamma_min=gamma_min)
        Optimizer.__init__(self, params, defaults)

    def _factor(self, group: dict[str, Any], t: int) -> float:
        return tvlars_factor(t, group["alpha"], group["lam"], group["delay"], group["gamma_min"])


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
