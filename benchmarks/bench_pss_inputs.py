"""What recording the PSS detector's input at every step costs, against the alternative.

    python benchmarks/bench_pss_inputs.py     # writes benchmarks/results/pss_inputs.md
    python benchmarks/bench_pss_inputs.py --check-run runs/chargpt-...   # and a real run

``--check-run`` adds, for a run written with PSS on, the steps the job intervened at (its
``pss/intervention`` tag), the steps the exact replay over ``pss_input.bin`` triggers at on
the job's settings, and what the old replay over the logged steps found.

The dashboard's exact what-if needs the value the detector saw at every optimizer step.
Two ways to put it on disk, timed side by side in one process (median of 5 rounds):

1. ``monitor.pss.inputs.InputLog.append``: one unbuffered 16-byte ``write`` per step to
   ``pss_input.bin`` (what the controller does);
2. one scalar event per step through the monitor's ``EventWriter`` (flushed, as the hook
   writes its records), i.e. logging ``pss/detector_input`` at every step.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import md_table, write_results  # noqa: E402
from monitor.pss.inputs import InputLog, read_inputs  # noqa: E402
from monitor.writer import EventWriter  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "pss_inputs.md")
STEPS = 5000


def per_step(fn, steps: int = STEPS) -> float:
    t0 = time.perf_counter()
    for step in range(steps):
        fn(step, 1.0 + step * 1e-6)
    return (time.perf_counter() - t0) / steps


def check_run(run_dir: str) -> str:
    """The job's interventions against both replays, on the job's own settings."""
    from dashboard import charts, data, whatif
    from monitor import schema
    from monitor.pss.inputs import replay

    reader = data.RunReader(run_dir)
    reader.refresh()
    table = reader.table()
    job = charts.intervention_steps(table).tolist()
    segments = read_inputs(run_dir)
    steps, _, _, hits = replay(segments)
    exact = [s for s, h in zip(steps, hits) if h]
    settings = segments[0].settings[0] if segments and segments[0].settings else None
    config = schema.PSSConfig(tau=settings[1], alpha=settings[2], warmup_steps=settings[3])
    logged_steps, grads = charts.series(table, schema.TAG_GLOBAL_GRAD_NORM)
    _, old = whatif.whatif_replay(logged_steps, grads, config)
    return md_table(["run", "steps seen", "job intervened at", "exact replay (pss_input.bin)",
                     f"old replay over {len(logged_steps)} logged steps"],
                    [[os.path.basename(run_dir.rstrip('/')), len(steps), job, exact,
                      logged_steps[old].tolist()]])


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-run", default=None)
    args = parser.parse_args()
    sidecar, scalar = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(5):
            log = InputLog(os.path.join(tmp), r * STEPS, 2.5, 0.1, 100)
            sidecar.append(per_step(log.append))
            log.close()
            with EventWriter(os.path.join(tmp, f"ev{r}")) as writer:
                scalar.append(per_step(lambda s, g: writer.write(s, {"pss/detector_input": g})))
            ev_bytes = sum(os.path.getsize(os.path.join(tmp, f"ev{r}", f))
                           for f in os.listdir(os.path.join(tmp, f"ev{r}")))
        side_bytes = os.path.getsize(os.path.join(tmp, "pss_input.bin"))
        t0 = time.perf_counter()
        segments = read_inputs(tmp)
        read_s = time.perf_counter() - t0
    n = sum(len(s.steps) for s in segments)
    a, b = statistics.median(sidecar), statistics.median(scalar)
    rows = [["pss_input.bin: InputLog.append (16 B, unbuffered write)", f"{a * 1e6:.1f}",
             f"{side_bytes / (5 * STEPS):.0f} B/step"],
            ["one scalar event per step (EventWriter.write, flushed)", f"{b * 1e6:.1f}",
             f"{ev_bytes / STEPS:.0f} B/step"],
            ["ratio scalar / sidecar", f"{b / a:.1f}x", ""],
            [f"read back {n:,} steps (read_inputs)", f"{read_s * 1e6 / n:.2f}",
             f"{read_s:.3f} s in all"]]
    body = (f"{STEPS} steps x 5 rounds, median per step, side by side in one process; "
            "the machine is shared and noisy.\n\n"
            + md_table(["what", "microseconds per step", "size / note"], rows)
            + "\n\nA training step of the demo char-GPT takes about 0.5 s on 2 cores; the "
              "sidecar's cost is below 1e-4 of it.")
    if args.check_run:
        body += ("\n\nOn a real run (the demo, `python demos/train_chargpt.py --pss`, its "
                 "settings: tau 2.5, alpha 0.1, warm-up 100; the issue's demo run intervened at "
                 "step 236 too):\n\n" + check_run(args.check_run))
    write_results(RESULTS, "PSS detector input on disk: sidecar file against scalar events",
                  body)


if __name__ == "__main__":
    main()
