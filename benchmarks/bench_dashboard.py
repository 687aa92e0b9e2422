"""How fast the dashboard reads a big run, against TensorBoard's EventAccumulator.

    python benchmarks/bench_dashboard.py           # writes benchmarks/results/dashboard.md
    python benchmarks/bench_dashboard.py --quick   # a smoke run (100 steps)

A run of 1,000,000 per-layer scalars (200 tensors x 5 metrics x 1,000 logged steps, plus
train/loss and train/grad_norm), written with the monitor's EventWriter (one event per step).

1. First chart, the Layers view's path: a fresh reader (the run was just selected) reads
   every event into its columnar store, the layer x step heatmap of one metric in model
   order is read from the columns (``RunReader.heatmap``, binned), and the Plotly figure is
   serialised to JSON as Streamlit sends it. Target: <= 2 s.
2. Refresh: 10 more steps are appended to the same file; the reader reads only those, and
   the same chart is redrawn. Target: <= 0.3 s.
3. The same loads with TensorBoard's EventAccumulator (size_guidance scalars=0: keep all),
   and the app itself in Streamlit's AppTest (``benchmarks/dashboard_app.py``): the time
   to its first chart and to the end of the page, cold, and a rerun after 10 more steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import dashboard_app  # noqa: E402
from benchmarks.common import md_table, write_results  # noqa: E402
from dashboard import charts, data, transforms  # noqa: E402
from monitor import schema  # noqa: E402
from monitor.writer import EventWriter  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "dashboard.md")
METRICS = ("stable_rank", "sigma_max", "grad_norm", "param_norm", "lr_effective")
KINDS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def layer_names(n: int = 200) -> list[str]:
    return [f"transformer.h.{i // len(KINDS)}.{KINDS[i % len(KINDS)]}" for i in range(n)]


def step_scalars(step: int, tags: list[str], rng: np.random.Generator) -> dict[str, float]:
    values = rng.lognormal(0.0, 0.3, len(tags))
    scalars = dict(zip(tags, values.tolist()))
    scalars[schema.TAG_LOSS] = 3.0 / (1 + step / 1000)
    scalars[schema.TAG_GLOBAL_GRAD_NORM] = float(rng.lognormal(0.0, 0.2))
    return scalars


def heatmap_json(reader: data.RunReader, layers: list[str]) -> float:
    """What dashboard.cache.heatmap and the Layers view run: columns -> binned -> JSON."""
    t0 = time.perf_counter()
    steps, z = charts.bin_columns(*reader.heatmap("stable_rank", layers))
    z = transforms.relative_rows(z, "value")
    charts.heatmap_figure(layers, steps, z, "stable_rank").to_json()
    return time.perf_counter() - t0


def first_chart(run_dir: str, layers: list[str]) -> tuple[data.RunReader, dict[str, float]]:
    """Fresh reader -> columns -> heatmap -> figure -> JSON; seconds per stage."""
    t0 = time.perf_counter()
    reader = data.RunReader(run_dir, "bench")
    reader.refresh()
    read = time.perf_counter() - t0
    chart = heatmap_json(reader, layers)
    assert reader.n_values >= 1_000_000 or QUICK, reader.n_values
    return reader, {"read": read, "chart": chart, "total": read + chart}


def refresh_chart(reader: data.RunReader, layers: list[str]) -> dict[str, float]:
    t0 = time.perf_counter()
    new = reader.refresh()
    read = time.perf_counter() - t0
    total = read + heatmap_json(reader, layers)
    assert new == 10, new
    return {"read": read, "total": total}


def accumulator(run_dir: str) -> tuple[object, float, int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t0 = time.perf_counter()
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    n = sum(len(acc.Scalars(tag)) for tag in acc.Tags()["scalars"])
    return acc, time.perf_counter() - t0, n


def main() -> None:
    global QUICK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    QUICK = args.quick
    n_steps = 100 if args.quick else 1000
    layers = layer_names()
    tags = [schema.layer_tag(m, layer) for m in METRICS for layer in layers]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as logdir:
        run_dir = os.path.join(logdir, "bench")
        writer = EventWriter(run_dir)
        t0 = time.perf_counter()
        for i in range(n_steps):
            writer.write(i * 10, step_scalars(i * 10, tags, rng), flush=False)
        writer.flush()
        write_s = time.perf_counter() - t0
        size_mb = os.path.getsize(writer.path) / 1e6
        data.RunReader(run_dir).refresh()  # warm the page cache and imports once

        firsts = [first_chart(run_dir, layers) for _ in range(args.repeats)]
        reader = firsts[-1][0]
        refreshes = []
        for r in range(args.repeats):
            for i in range(n_steps + 10 * r, n_steps + 10 * (r + 1)):
                writer.write(i * 10, step_scalars(i * 10, tags, rng), flush=False)
            writer.flush()
            refreshes.append(refresh_chart(reader, layers))

        acc_runs = [accumulator(run_dir) for _ in range(max(1, args.repeats // 2))]
        acc, _, acc_scalars = acc_runs[-1]
        for i in range(n_steps + 10 * args.repeats, n_steps + 10 * args.repeats + 10):
            writer.write(i * 10, step_scalars(i * 10, tags, rng), flush=False)
        writer.flush()
        t0 = time.perf_counter()
        acc.Reload()
        acc_refresh = time.perf_counter() - t0
        def append(last: int) -> None:
            for step in range(last + 10, last + 110, 10):
                writer.write(step, step_scalars(step, tags, rng), flush=False)
            writer.flush()

        app = {view: dashboard_app.app_path(logdir, view, append)
               for view in ("Layers", "Overview")}
        writer.close()

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    first_times = [t for _, t in firsts]
    rows = [
        ["first chart: read events into the columns", f"{med(first_times, 'read'):.3f}", ""],
        ["first chart: heatmap from the columns + figure + JSON",
         f"{med(first_times, 'chart'):.3f}", ""],
        ["**first chart, total**", f"**{med(first_times, 'total'):.3f}**",
         f"max {max(t['total'] for t in first_times):.3f}; target <= 2 s"],
        ["refresh (+10 steps = 10,020 scalars): read new events",
         f"{med(refreshes, 'read'):.3f}", ""],
        ["**refresh, total (read + chart + JSON)**", f"**{med(refreshes, 'total'):.3f}**",
         f"max {max(r['total'] for r in refreshes):.3f}; target <= 0.3 s"],
        ["TensorBoard EventAccumulator: Reload + all Scalars",
         f"{statistics.median(t for _, t, _ in acc_runs):.3f}",
         f"{acc_scalars:,} scalars kept"],
        ["TensorBoard EventAccumulator: Reload after +10 steps", f"{acc_refresh:.3f}", ""],
    ]
    for view, label in (("Layers", "heatmap, alerts, lines"), ("Overview", "alerts, loss")):
        got = app[view]
        rows += [[f"app (AppTest), {view}, cold: first chart / whole page ({label})",
                  f"{got['first_chart']:.3f} / {got['first_page']:.3f}", "target <= 2 s"],
                 [f"app (AppTest), {view}: rerun after +10 steps, first chart / whole page",
                  f"{got['refresh_chart']:.3f} / {got['refresh_page']:.3f}", "target <= 0.3 s"]]
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    body = (f"Run: {len(layers)} tensors x {len(METRICS)} metrics x {n_steps} logged steps "
            f"= {len(layers) * len(METRICS) * n_steps:,} per-layer scalars (+2 global per step), "
            f"one event per step, {size_mb:.1f} MB, written in {write_s:.1f} s by EventWriter. "
            f"Median of {args.repeats} repeats (seconds), nice 0; load at the end: `{load}`.\n\n"
            + md_table(["what", "seconds", "note"], rows))
    if args.quick:
        print(body)
    else:
        write_results(RESULTS, "Dashboard load and refresh", body)


QUICK = False

if __name__ == "__main__":
    main()
