"""The PSS what-if: the job's detection rule replayed over what its detector saw.

``whatif_exact`` replays ``monitor.pss.detect.Detector`` over every step's input
(``pss_input.bin``, see ``monitor.pss.inputs``); ``whatif_replay`` is the fallback over the
logged gradient norms for runs without that file; ``whatif_figure`` draws either.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from dashboard.charts import PALETTE, downsample, finite_or_nan, frame, line, log_axis
from monitor import schema
from monitor.pss import detect, inputs


def whatif_replay(steps: np.ndarray, grad_norms: np.ndarray, config: schema.PSSConfig
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(ratios, triggered)`` per logged step: the job's own rule (``monitor.pss.detect``).

    The fallback for runs without ``pss_input.bin`` (see :func:`whatif_exact`): the warm-up
    follows the step numbers; the average moves once per logged value, so on a run logged
    every N steps this only approximates what the job, which sees every step, does.
    """
    pairs = zip(np.asarray(steps).tolist(), np.asarray(grad_norms, float).tolist())
    rows = detect.trace(pairs, config.tau, config.alpha, config.warmup_steps)
    return (np.array([r[1] for r in rows], float).reshape(-1),
            np.array([r[2] for r in rows], bool).reshape(-1))


def whatif_exact(segments, config: schema.PSSConfig | None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(steps, values, ratios, triggered)`` over every step the job's detector saw
    (``monitor.pss.inputs``), with ``config``'s tau, alpha and warm-up throughout; None
    replays the job's own settings history, i.e. exactly its triggers."""
    if config is None:
        steps, values, ratios, hits = inputs.replay(segments)
    else:
        steps, values, ratios, hits = inputs.replay(segments, config.tau, config.alpha,
                                                    config.warmup_steps)
    return (np.asarray(steps, np.int64), np.asarray(values, float), np.asarray(ratios, float),
            np.asarray(hits, bool))


def whatif_figure(steps: np.ndarray, grad_norms: np.ndarray, triggered: np.ndarray,
                  logged: np.ndarray | None = None, every_step: bool = False) -> go.Figure:
    """Gradient norm with the steps the chosen settings would trigger on (and those logged)."""
    fig = go.Figure()
    x, y = downsample(np.asarray(steps), np.asarray(grad_norms, float))
    fig.add_trace(line(x, y, "global gradient norm (detector input)" if every_step
                       else "global gradient norm", PALETTE[0]))
    hit = np.asarray(triggered, bool)
    marks = finite_or_nan(grad_norms)
    top = np.nanmax(marks) if np.isfinite(marks).any() else 1.0
    marks = np.where(np.isnan(marks), top, marks)  # a non-finite norm triggers: mark it on top
    fig.add_trace(go.Scatter(x=np.asarray(steps)[hit], y=marks[hit],
                             mode="markers", name="would trigger",
                             marker=dict(symbol="circle-open", size=12, color="#ff7f0e",
                                         line=dict(width=2))))
    if logged is not None and len(logged):
        gy = np.interp(logged, steps, grad_norms) if len(steps) else np.ones(len(logged))
        fig.add_trace(go.Scatter(x=logged, y=gy, mode="markers", name="the job intervened",
                                 marker=dict(symbol="x", size=9, color="#d62728")))
    log_axis(fig)
    fig.update_yaxes(title="||g|| (all parameters)")
    fig.update_xaxes(title="optimizer step")
    what = "every step's detector input" if every_step else "the logged gradient norms"
    return frame(fig, f"what-if: detection replayed over {what}")
