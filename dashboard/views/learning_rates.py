"""Learning rates: applied and effective rate per layer, and one heatmap per run."""

from __future__ import annotations

import streamlit as st

from dashboard import cache, charts, widgets
from dashboard.views import Context

EXPLAIN = ("**applied** (solid): the rate the optimizer applied, group lr x any trust ratio "
           "(LARS/LAMB). **effective** (dotted): the measured ||ΔW|| / ||G|| per step. For "
           "Adam the effective rate is about lr / sqrt(v), often ~100x the applied one by "
           "design (Adam divides by the gradient's RMS); for SGD they agree. Worry when "
           "layers' effective rates differ by orders of magnitude or jump while the applied "
           "rate does not.")


def render(ctx: Context) -> None:
    present = set(ctx.layer_metrics())
    if not {"lr", "lr_effective"} & present:
        st.info("No learning rates logged in the selected runs (metrics `lr` and "
                "`lr_effective` are written at logged steps after the optimizer step).")
        return
    st.caption(EXPLAIN)
    all_layers = charts.layer_order(ctx.layers(), cache.model_order(ctx.runs))
    layers, _, error = widgets.layer_pattern("Layers (regex)", "lr_filter", all_layers,
                                             default=widgets.exact_pattern(all_layers[:4]))
    if error:
        st.error(error)
        return
    if len(layers) > charts.MAX_LINES:
        st.caption(f"{len(layers)} layers match; the first {charts.MAX_LINES} are drawn.")
    rows = ctx.rows("lr", "lr_effective")
    widgets.chart(charts.lr_figure(rows, layers, style=ctx.style), "lr",
                  rows[rows["layer"].isin(layers[:charts.MAX_LINES])])
    if "lr_effective" in present:
        heat_layers = charts.layer_order(ctx.layers("lr_effective"),
                                         cache.model_order(ctx.runs))[:charts.MAX_HEATMAP_LAYERS]
        for i, run in enumerate(ctx.runs):  # one labelled heatmap per run
            steps, z = cache.heatmap(ctx.key + (run.name,), "lr_effective", tuple(heat_layers),
                                     "value", ctx.reader(run.name))
            fig = charts.heatmap_figure(heat_layers, steps, z, "lr_effective", log=True,
                                        title=f"effective learning rate: layer x step · run "
                                              f"{run.name}")
            widgets.chart(fig, f"lr_heatmap_{i}")
