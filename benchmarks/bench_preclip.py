"""What the pre-clip gradient-norm tap (``monitor/preclip.py``) costs a training step.

    python benchmarks/bench_preclip.py            # writes benchmarks/results/preclip.md
    python benchmarks/bench_preclip.py --quick

One training step of the demo GPT (forward, backward, ``clip_grad_norm_(1.0)``, AdamW) in
three variants, measured side by side in interleaved rounds (the machine is shared):
no tap; the tap installed but not wanted on this step (one Python call per parameter per
backward); the tap wanted (one norm per parameter per backward, then ``take()``, one host
transfer). Reported: the median step time of each variant and its ratio to no tap. Time is
the thread's CPU time (``time.thread_time``, one torch thread): on a machine shared with
other jobs, wall time mostly measures the others.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import md_table, write_results  # noqa: E402
from demos.model import GPT, GPTConfig  # noqa: E402
from monitor.preclip import PreClipNorms  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "preclip.md")


def step_times(variant: str, model, opt, x, y, n: int) -> list[float]:
    params = list(model.parameters())
    tap = PreClipNorms(params, lambda: variant == "wanted") if variant != "none" else None
    out = []
    try:
        for _ in range(n):
            start = time.thread_time()
            _, loss = model(x, y)
            loss.backward()
            if tap is not None and variant == "wanted":
                tap.take(params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(time.thread_time() - start)
    finally:
        if tap is not None:
            tap.remove()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_embd=64, block_size=32)  # small: the per-tensor cost weighs most
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (8, cfg.block_size))
    rounds, per = (2, 3) if args.quick else (6, 10)
    times: dict[str, list[float]] = {"none": [], "installed": [], "wanted": []}
    step_times("none", model, opt, x, x, 3)  # warm-up
    for _ in range(rounds):
        for variant in times:
            times[variant] += step_times(variant, model, opt, x, x, per)
    base = statistics.median(times["none"])
    rows = [[v, f"{1000 * statistics.median(t):.1f}", f"{statistics.median(t) / base:.3f}"]
            for v, t in times.items()]
    n_params = sum(1 for _ in model.parameters())
    body = (f"Demo GPT ({cfg.n_layer} layers, d = {cfg.n_embd}, {n_params} parameter tensors, "
            f"batch 8 x {cfg.block_size}), one CPU thread; {rounds} interleaved rounds of {per} "
            "steps per variant; median CPU time of a step (thread time).\n\n"
            + md_table(["variant", "median step (ms)", "vs no tap"], rows)
            + "\nThe monitor wants the norms on logged steps and, with PSS on, on every step.\n")
    write_results(args.out, "Cost of the pre-clip gradient-norm tap", body)


if __name__ == "__main__":
    main()
