"""What each metric means, its range, when to worry, and the alert thresholds to draw.

Pure data for the app's captions and the charts' reference lines. Thresholds come from the
alert rules' own defaults (``dashboard.alerts.LIMITS``), so a line on a chart is the
level at which the Overview raises an alert.
"""

from __future__ import annotations

from dataclasses import dataclass

from dashboard import alerts
from monitor import schema


ALERT = alerts.LIMITS


@dataclass(frozen=True)
class Explanation:
    meaning: str  # one line
    range: str
    worry: str  # when to worry
    unit: str = ""  # y-axis title
    lines: tuple[tuple[float, str], ...] = ()  # (y, label) reference lines

    def caption(self) -> str:
        return f"**Meaning**: {self.meaning} **Range**: {self.range}. **Worry when**: {self.worry}"


EXPLANATIONS: dict[str, Explanation] = {
    "stable_rank": Explanation(
        "||W||_F^2 / sigma_1^2, how many directions carry the weight's energy.",
        "1 (rank one) to the matrix rank; random init is high and falls fast at first",
        f"it keeps falling after the first steps: an alert fires below "
        f"{ALERT.get('collapse_ratio', 0.5):g} x its peak, or below {ALERT.get('sr_floor', 1.5):g} "
        "(nearly rank one, a 'parametric singularity' PSS smooths).",
        "stable rank", ((ALERT.get("sr_floor", 1.5), "collapse floor"),)),
    "sigma_max": Explanation(
        "largest singular value sigma_1 of the weight (its operator norm).",
        "> 0; grows slowly during healthy training",
        "it grows fast or by orders of magnitude: logits and activations blow up with it.",
        "sigma_1"),
    "sje": Explanation(
        "stable Jacobian energy: share of the gradient's energy in the weight's top-k "
        "singular directions.",
        "0 to 1",
        f"it stays above {ALERT.get('sje_threshold', 0.8):g} for "
        f"{ALERT.get('sje_steps', 3)}+ logged steps: updates keep reinforcing the top "
        "direction (the paper's warning level).",
        "SJE (fraction)", ((ALERT.get("sje_threshold", 0.8), "SJE alert"),)),
    "ntk_eig": Explanation(
        "largest eigenvalue of the layer's cosine NTK over a probe batch of n samples.",
        "1 (samples unrelated) to n (all samples move together)",
        "it approaches n: the layer's gradients for different samples align (lazy, collapsed "
        "features).", "lambda_max (cosine NTK)"),
    "grad_norm": Explanation(
        "Frobenius norm of the layer's gradient.", ">= 0; compare layers and its own history",
        "it jumps by 10x or more against its recent level, or is NaN/inf.", "||G||_F"),
    "param_norm": Explanation(
        "Frobenius norm of the weight.", ">= 0; drifts slowly",
        "it grows without bound (weight decay too weak, LR too high).", "||W||_F"),
    "update_ratio": Explanation(
        "||W_after - W_before|| / ||W_before||: relative change of the weight per step.",
        "typically around 1e-3 per step for Adam-trained transformers",
        "it stays above 1e-2 (the weight is rewritten in a hundred steps) or collapses below "
        "1e-5 (the layer stopped learning).",
        "relative update per step", ((1e-2, "fast"), (1e-5, "frozen"))),
    "lr": Explanation(
        "learning rate the optimizer applied: group lr x any trust ratio (LARS/LAMB).",
        "> 0", "it does not follow the schedule you set.", "learning rate"),
    "lr_effective": Explanation(
        "measured ||W_after - W_before|| / ||G||: the step size per unit of gradient.",
        "> 0; for Adam about lr / sqrt(v), often ~100x the applied lr by design (Adam "
        "normalises by the gradient's RMS), for SGD about the applied lr",
        "layers differ by orders of magnitude, or it jumps while the applied lr does not.",
        "effective step per unit gradient"),
    schema.TAG_LOSS: Explanation("training loss the job passed with mon.log(loss=...).",
                                 ">= 0", "it jumps up and does not come back (a spike).",
                                 "loss"),
    schema.TAG_GLOBAL_GRAD_NORM: Explanation(
        "norm of all gradients together (what PSS's detector watches).", ">= 0",
        "it jumps far above its moving average (PSS triggers above tau x the average).",
        "global ||g||"),
}
for key in schema.PSS_LAYER_METRICS:
    EXPLANATIONS[key] = Explanation(
        f"{key.removeprefix('pss_').replace('_', ' ')} of a layer PSS smoothed, at the "
        "intervention.", "see stable_rank / sigma_max",
        "sigma barely falls (the smoothing did little) or SR after is still near 1.",
        key.removeprefix("pss_"))


def explain(metric: str) -> Explanation | None:
    return EXPLANATIONS.get(metric)


def reference_lines(metric: str) -> tuple[tuple[float, str], ...]:
    found = EXPLANATIONS.get(metric)
    return found.lines if found else ()


def unit(metric: str) -> str:
    found = EXPLANATIONS.get(metric)
    return found.unit if found and found.unit else metric
